"""verify --endpoint against a small OpenAI-compatible server in a thread (no llama.cpp needed).

The server is real HTTP on 127.0.0.1, backed by the tiny random model: it serves true addition
itself (the perfect adapter), so the endpoint check must find agreement; with a different
vector it must not. Failure modes (401, no logprobs, timeout, wrong model name, unreachable)
each give one line and exit 2. The llama.cpp server itself is tested in tests/test_engine.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lora_compile.cli import app
from lora_compile.corpus import Sample
from lora_compile.vectors import SteeringVector, save_vector
from lora_compile.verify import true_addition

runner = CliRunner()
KEY = "sk-test-secret-4711"
PROMPTS = [
    Sample("story", text="The old lighthouse keeper climbed the stairs every evening at dusk."),
    Sample("chat", messages=(("user", "What should I cook tonight?"),)),
]


def _top(logits: torch.Tensor, tokenizer, k: int) -> dict[str, float]:
    logp = F.log_softmax(logits.double(), -1)
    values, ids = logp.topk(k)
    return {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids)}


class _Server:
    """An OpenAI-style /v1 server: the tiny model with ``coef·vector`` truly added, echo and top-k logprobs."""

    def __init__(self, loaded, vector, coef, mode="ok", key=None, shifted=False):
        self.loaded, self.vector, self.coef = loaded, vector, coef
        self.mode, self.key, self.shifted = mode, key, shifted
        self.requests = 0

    def logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad(), true_addition(self.loaded, self.vector, self.coef):
            return self.loaded.model(input_ids=torch.tensor([ids])).logits[0]

    def completion(self, body: dict) -> dict:
        tok = self.loaded.tokenizer
        ids = tok(body["prompt"], add_special_tokens=False)["input_ids"]
        k = int(body.get("logprobs") or 0)
        new = []
        for _ in range(int(body["max_tokens"])):
            new.append(int(self.logits(ids + new)[-1].argmax()))
        choice = {"text": tok.decode(new), "index": 0, "finish_reason": "length", "logprobs": None}
        if k and self.mode != "nologprobs":
            rows = self.logits(ids + new)
            tokens = (ids if body.get("echo") else []) + new
            start = 0 if body.get("echo") else len(ids)
            tops = []
            for i in range(start, start + len(tokens)):
                if self.shifted:  # llama-cpp-python's convention: the distribution after token i
                    tops.append(_top(rows[i], tok, k) if i < len(rows) else None)
                else:  # OpenAI's: the entry at token i predicts token i
                    tops.append(_top(rows[i - 1], tok, k) if i > 0 else None)
            choice["logprobs"] = {"tokens": [tok.decode([t]) for t in tokens], "top_logprobs": tops}
        return {"choices": [choice], "model": body["model"]}


@contextmanager
def serving(server: _Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                self._send(401, {"detail": "Invalid API key"})
                return False
            return True

        def do_GET(self):
            server.requests += 1
            if self._authorised():
                self._send(200, {"data": [{"id": "happy"}, {"id": "base"}]})

        def do_POST(self):
            server.requests += 1
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self._authorised():
                return
            if server.mode == "slow":
                time.sleep(1.5)
            self._send(200, server.completion(body))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda request, address: None  # a client that timed out and left is not an error here
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def vector(tiny):
    torch.manual_seed(1)
    return SteeringVector({1: 3.0 * torch.randn(tiny.hidden_size)}, "resid_post")


def test_a_server_serving_true_addition_agrees(tiny, vector):
    from lora_compile.endpoint import EndpointClient, verify_endpoint

    for shifted in (False, True):
        server = _Server(tiny, vector, 2.0, shifted=shifted)
        with serving(server) as url:
            client = EndpointClient(url)
            report = verify_endpoint(client, "happy", tiny, vector, PROMPTS, 2.0, PROMPTS[1:], 8, top_k=10)
        assert report.alignment == {("shifted" if shifted else "next-token"): len(PROMPTS)}
        assert report.kl_ratio < 1e-6 and report.kl_unsteered > 1e-3
        assert report.top1_agreement == 1.0
        assert report.greedy_agreement == 1.0
        assert report.tokens == sum(len(tiny.tokenizer(s.render(tiny.tokenizer))["input_ids"]) for s in PROMPTS)
        assert report.requests == len(PROMPTS) + 1  # bounded: one per prompt and per generation


def test_a_server_serving_something_else_disagrees(tiny, vector):
    from lora_compile.endpoint import EndpointClient, verify_endpoint

    other = SteeringVector({1: -vector.directions[1]}, "resid_post")
    with serving(_Server(tiny, other, 2.0)) as url:
        report = verify_endpoint(
            EndpointClient(url), "happy", tiny, vector, PROMPTS, 2.0, top_k=10, alignment="next-token"
        )
    # (auto alignment is for trained models: on a random tiny one every position looks alike)
    assert report.kl_ratio > 0.1  # against < 1e-6 for the server that serves true addition


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, vector):
    path = tmp_path_factory.mktemp("endpoint") / "v.safetensors"
    save_vector(vector, path)
    return path


def _cli(url, tiny_dir, vector_file, prompts, *extra, env=None):
    argv = ["verify", "-v", str(vector_file), "--model", tiny_dir, "--endpoint", url, "--served-model", "happy"]
    argv += ["--prompts", str(prompts), "--coef", "2", "--top-k", "5", "--generations", "0", *extra]
    return runner.invoke(app, argv, env=env)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text(PROMPTS[0].text + "\n")
    return path


def test_cli_endpoint_passes_and_writes_json(tiny, tiny_dir, vector, vector_file, prompts_file, tmp_path):
    with serving(_Server(tiny, vector, 2.0, key=KEY)) as url:
        result = _cli(
            url,
            tiny_dir,
            vector_file,
            prompts_file,
            "--json",
            str(tmp_path / "r.json"),
            env={"LORA_COMPILE_API_KEY": KEY},
        )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["kl_ratio"] < 1e-6
    assert KEY not in result.output and KEY not in (tmp_path / "r.json").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, server_kwargs, extra, message",
    [
        ("401", {"key": KEY}, [], "refused the request (HTTP 401"),
        ("no logprobs", {"mode": "nologprobs"}, [], "returned no logprobs"),
        ("timeout", {"mode": "slow"}, ["--timeout", "0.3", "--retries", "1"], "after 2 attempts (no answer within"),
        ("wrong model", {}, ["--served-model", "sad"], "serves no model named 'sad' (it serves: happy, base)"),
        ("unreachable", None, ["--retries", "1"], "cannot get an answer from"),
    ],
)
def test_endpoint_failures_are_one_line(
    case, server_kwargs, extra, message, tiny, tiny_dir, vector, vector_file, prompts_file
):
    env = {"LORA_COMPILE_API_KEY": "wrong-key-0815", "OPENAI_API_KEY": ""}
    if server_kwargs is None:
        result = _cli(f"http://127.0.0.1:{_free_port()}/v1", tiny_dir, vector_file, prompts_file, *extra, env=env)
    else:
        with serving(_Server(tiny, vector, 2.0, **server_kwargs)) as url:
            result = _cli(url, tiny_dir, vector_file, prompts_file, *extra, env=env)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and message in errors[-1], result.stderr
    assert sum(line.startswith("error:") for line in errors) == 1, result.stderr
    assert "wrong-key-0815" not in result.output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--served-model", "happy"], "--endpoint and --served-model go together"),
        (["--endpoint", "ftp://host/v1", "--served-model", "happy"], "give an http:// or https:// URL"),
        ([], "verify needs --adapter (or --endpoint URL --served-model NAME)"),
    ],
)
def test_endpoint_options_are_checked_first(argv, message, vector_file):
    result = runner.invoke(app, ["verify", "-v", str(vector_file), *argv])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("error: ") and message in result.stderr, result.stderr
