"""llama.cpp end to end: its converter, its kernels, its control vectors and its OpenAI server.

Marked ``engine``: they need llama-cpp-python and llama.cpp's converter (scripts/setup_engine.sh)
and are skipped, saying so, where those are not installed. Run them with ``pytest -m engine``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from typer.testing import CliRunner

from lora_compile import api, corpus
from lora_compile.calibrate import calibrate, encode
from lora_compile.cli import app
from lora_compile.errors import LoraCompileError
from lora_compile.models import embedded_model_path
from lora_compile.vectors import SteeringVector, save_vector
from lora_compile.verify import VERIFY_MAX_TOKENS, token_kl

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run scripts/setup_engine.sh")
try:
    from lora_compile.engine import LlamaCppModel, converter_dir

    converter_dir()
except LoraCompileError as exc:  # the converter is not unpacked
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = pytest.mark.engine
runner = CliRunner()
COEF = 4.0
LAYER = 10
KEY = "engine-test-key-1234"


@pytest.fixture(scope="module")
def compiled(smol, smol_vector, tmp_path_factory):
    """The demo vector at resid_post 10, compiled (portable), its GGUF LoRA, and its control vector."""
    root = tmp_path_factory.mktemp("engine")
    vec = SteeringVector({LAYER: smol_vector.directions[LAYER]}, "resid_post")
    cal = calibrate(smol, corpus.default_calibration(), [("resid_post", LAYER)])
    api.compile_adapter(vec, root / "adapter", smol, coef=COEF, calibration=cal)
    api.convert_adapter_to_gguf(root / "adapter", root / "adapter.gguf")
    api.export_gguf(vec, root / "cvec.gguf")
    save_vector(vec, root / "vector.safetensors")
    return root, vec


def test_converter_makes_a_gguf_lora_llama_cpp_loads(compiled, smol, heldout_subset, tmp_path):
    root, _ = compiled
    # llama.cpp's converter is deterministic here: the same adapter gives the same bytes.
    result = runner.invoke(app, ["export-gguf-lora", str(root / "adapter"), "-o", str(tmp_path / "again.gguf")])
    assert result.exit_code == 0, result.output
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "adapter.gguf", tmp_path / "again.gguf")]
    assert digest[0] == digest[1]
    ids = encode(smol, heldout_subset[:1], VERIFY_MAX_TOKENS)[0]
    runs = []
    for lora in (None, root / "adapter.gguf"):
        llm = LlamaCppModel(embedded_model_path(), lora=lora)
        runs.append(llm.logits(ids))
        llm.close()
    plain, steered = runs
    assert steered.shape == plain.shape == (len(ids), smol.model.config.vocab_size)
    assert float(token_kl(torch.from_numpy(plain), torch.from_numpy(steered)).mean()) > 0.05  # it steers


@pytest.mark.numeric
def test_llama_cpp_lora_agrees_with_llama_cpp_control_vector(compiled, smol, heldout_subset, bound):
    """Inside one engine: the compiled LoRA against llama.cpp's own addition of the same vector at resid_post."""
    root, _ = compiled
    token_lists = encode(smol, heldout_subset, VERIFY_MAX_TOKENS)
    runs = {}
    for name, kwargs in {
        "plain": {},
        "cvec": {"control_vector": root / "cvec.gguf", "strength": COEF},
        "lora": {"lora": root / "adapter.gguf"},
    }.items():
        llm = LlamaCppModel(embedded_model_path(), **kwargs)
        runs[name] = [torch.from_numpy(llm.logits(ids)) for ids in token_lists]
        llm.close()
    kl_c = torch.cat([token_kl(c, lo) for c, lo in zip(runs["cvec"], runs["lora"])]).mean()
    kl_u = torch.cat([token_kl(c, p) for c, p in zip(runs["cvec"], runs["plain"])]).mean()
    top1 = torch.cat([c.argmax(-1) == lo.argmax(-1) for c, lo in zip(runs["cvec"], runs["lora"])]).float().mean()
    _all_bounds(
        bound,
        ("KL ratio in llama.cpp, LoRA vs control vector, resid_post 10", float(kl_c / kl_u), 0.1),
        ("top-1 agreement in llama.cpp, LoRA vs control vector, resid_post 10", float(top1), 0.9, "min"),
    )


def _all_bounds(bound, *checks) -> None:
    """Record every bound, then fail with all that are broken."""
    broken = []
    for check in checks:
        try:
            bound(*check)
        except AssertionError as exc:
            broken.append(str(exc))
    assert not broken, "; ".join(broken)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(compiled, tmp_path_factory):
    """llama-cpp-python's OpenAI server on 127.0.0.1 with an API key: 'happy' (the converted adapter), 'nologits'."""
    root, _ = compiled
    port = _free_port()
    gguf = str(embedded_model_path())
    common = {"model": gguf, "n_ctx": 1024, "n_threads": 2, "verbose": False}
    config = {
        "host": "127.0.0.1",
        "port": port,
        "api_key": KEY,
        "models": [
            {**common, "model_alias": "happy", "lora_path": str(root / "adapter.gguf"), "logits_all": True},
            {**common, "model_alias": "nologits", "logits_all": False},
        ],
    }
    path = tmp_path_factory.mktemp("server") / "config.json"
    path.write_text(json.dumps(config))
    log = open(path.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--config_file", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            req = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(req, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"llama_cpp.server did not start: {(path.parent / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.numeric
def test_verify_endpoint_reproduces_local_verify(server, compiled, smol, heldout_subset, bound, monkeypatch):
    root, vec = compiled
    monkeypatch.setenv("LORA_COMPILE_API_KEY", KEY)
    # One prompt per domain: llama-cpp-python sorts the whole vocabulary in Python for every echoed
    # position, so each request takes seconds (hence the long timeout).
    prompts = list({s.domain: s for s in reversed(heldout_subset)}.values())
    local = api.verify_adapter(root / "adapter", vec, smol, prompts=prompts, generations=2)
    served = api.verify_endpoint(
        server, "happy", vec, smol, adapter=root / "adapter", prompts=prompts, generations=2, top_k=20, timeout=600
    )
    # llama-cpp-python's echo: shifted, except where it drops a leading BOS (SmolLM2's <|im_start|>: chats)
    chats = sum(s.is_chat for s in prompts)
    assert served.alignment == {"shifted": len(prompts) - chats, "next-token": chats}
    assert served.requests == 1 + len(prompts) + min(2, chats)  # bounded: the listing, one per prompt and generation
    assert 0.9 * local.tokens <= served.tokens <= local.tokens  # all but the dropped special tokens
    _all_bounds(
        bound,
        # How much of the distribution the server's top-20 carries (measured 0.77 on these prompts):
        # the KL below is on that set, so it must be the bulk of it.
        ("probability mass of true addition on the server's top-20", served.mass_covered, 0.6, "min"),
        ("|top-1 agreement, endpoint − local verify|", abs(served.top1_agreement - local.top1_agreement), 0.03),
        ("KL ratio (top-20), endpoint over local verify", served.kl_ratio / local.kl_ratio, 3.0),
    )


def _cli(url, root, *extra, env):
    argv = ["verify", "-v", str(root / "vector.safetensors"), "-a", str(root / "adapter"), "--endpoint", url]
    argv += ["--served-model", "happy", "--generations", "0", "--top-k", "5", *extra]
    return runner.invoke(app, argv, env={"OPENAI_API_KEY": "", "LORA_COMPILE_API_KEY": KEY, **env})


@pytest.mark.parametrize(
    "case, extra, env, message",
    [
        ("401", [], {"LORA_COMPILE_API_KEY": "not-the-key"}, "refused the request (HTTP 401"),
        ("no logprobs", ["--served-model", "nologits"], {}, "returned no logprobs"),
        ("wrong model", ["--served-model", "sad"], {}, "serves no model named 'sad' (it serves: happy, nologits)"),
        ("timeout", ["--timeout", "0.001", "--retries", "1"], {}, "after 2 attempts (no answer within"),
    ],
)
def test_llama_cpp_server_failures_are_one_line(case, extra, env, message, server, compiled, tmp_path):
    root, _ = compiled
    prompts = tmp_path / "p.txt"
    prompts.write_text("A short held-out sentence about the sea.\n")
    result = _cli(server, root, "--prompts", str(prompts), *extra, env=env)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and message in errors[-1], result.stderr
    assert sum(line.startswith("error:") for line in errors) == 1
    assert KEY not in result.output and "not-the-key" not in result.output
    assert os.environ.get("LORA_COMPILE_API_KEY") != KEY  # the key only ever lived in the command's environment
