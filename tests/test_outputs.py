"""Outputs survive interruption and races: real signals to real processes, two compiles at once.

Each test runs the CLI in a subprocess (``python -m lora_compile.cli``). With stderr not a
terminal, every pass prints one line as it starts ("calibrating (N steps)"): the tests wait
for that line, or for the temporary directory of the write, and then send the signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_compile.outputs import atomic_dir, atomic_file
from lora_compile.targets import lint, profile, read_adapter
from lora_compile.vectors import SteeringVector, save_vector

CLI = [sys.executable, "-m", "lora_compile.cli"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir):
    """A vector for the tiny model, contrast pairs, and calibration text big enough to take seconds."""
    d = tmp_path_factory.mktemp("interrupt-inputs")
    save_vector(SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(3))}), d / "v.safetensors")
    words = "the quick brown fox jumps over a lazy dog while rain falls on quiet hills".split()
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(120))}) for i in range(6000)]
    (d / "big.jsonl").write_text("\n".join(lines))
    (d / "medium.jsonl").write_text("\n".join(lines[:600]))  # a compile of a second or two: enough to overlap
    (d / "held.jsonl").write_text(json.dumps({"text": "A short held-out story about a fox."}))
    (d / "pairs.jsonl").write_text(
        "\n".join(
            json.dumps({"positive": " ".join(words[: 1 + i % 15]) + " glad", "negative": "sad"}) for i in range(4000)
        )
    )
    return d


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _interrupt(args: list[str], sig: int, when_line: str | None = None, when_path: tuple[Path, str] | None = None):
    """Run the CLI, send ``sig`` once stderr shows ``when_line`` (or a file matching ``when_path`` appears)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    try:
        if when_line is not None:
            for line in proc.stderr:
                seen.append(line)
                if when_line in line:
                    break
        else:
            directory, prefix = when_path
            deadline = time.time() + 240
            while not any(p.name.startswith(prefix) for p in directory.iterdir()) and proc.poll() is None:
                assert time.time() < deadline, "the write never started"
                time.sleep(0.005)
        assert proc.poll() is None, "finished before the signal: make the input bigger. " + "".join(seen)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(seen) + err


@pytest.mark.parametrize(
    "command, sig, when",
    [
        (
            ["compile", "-v", "{d}/v.safetensors", "--texts", "{d}/big.jsonl", "-o", "{o}/out"],
            signal.SIGINT,
            "calibrating",
        ),
        (["scan", "--texts", "{d}/big.jsonl", "--layers", "1", "-o", "{o}"], signal.SIGTERM, "calibrating"),
        (
            ["extract", "--pairs", "{d}/pairs.jsonl", "--layer", "1", "-o", "{o}/out.safetensors"],
            signal.SIGINT,
            "reading activations",
        ),
    ],
    ids=["compile-SIGINT", "scan-SIGTERM", "extract-SIGINT"],
)
def test_a_signal_leaves_nothing(inputs, tiny_dir, tmp_path, command, sig, when):
    code, err = _interrupt([a.format(d=inputs, o=tmp_path) for a in command] + ["--model", tiny_dir], sig, when)
    assert code == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"error: interrupted by {signal.Signals(sig).name}: nothing was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


def test_a_signal_during_the_merged_write_leaves_nothing(smol, tmp_path):
    """SIGTERM while the embedded model's merged weights (≈ 0.5 GB) are being written into the temporary."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["o_proj"]})
    )
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.3.self_attn.o_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.ones(1, 576), f"{key}.lora_B.weight": torch.ones(576, 1) * 1e-3},
        str(adapter / "adapter_model.safetensors"),
    )
    out = tmp_path / "outputs"
    out.mkdir()
    code, err = _interrupt(
        ["merge", "-a", str(adapter), "-o", str(out / "merged")], signal.SIGTERM, when_path=(out, ".merged.")
    )
    assert code == 128 + signal.SIGTERM, err
    assert list(out.iterdir()) == []


def _compile(inputs, tiny_dir, out: Path, coef: float, force: bool) -> subprocess.Popen:
    args = ["compile", "-v", str(inputs / "v.safetensors"), "--texts", str(inputs / "medium.jsonl")]
    args += ["--coef", str(coef), "-o", str(out), "--model", tiny_dir, "--heldout", str(inputs / "held.jsonl")]
    return subprocess.Popen([*CLI, *args] + (["--force"] if force else []), stderr=subprocess.PIPE, text=True)


def _whole(out: Path) -> float:
    """The adapter at ``out`` is one compile's whole output: its tensors match its own report. Returns its coef."""
    report = json.loads((out / "compile_report.json").read_text())
    adapter = read_adapter(out)
    assert lint(adapter, profile("portable")) == []
    (layer,) = report["layers"]
    b = adapter.tensors[f"base_model.model.model.layers.{layer['layer']}.mlp.down_proj.lora_B.weight"][:, 0]
    # A = k·b, B = s/k with ‖A‖ = ‖B‖, so ‖B‖² = ‖s‖·‖b‖: the tensors and the report come from the same run.
    expected = layer["vector_norm"] * layer["direction_norm"]
    assert float(b.double().norm() ** 2) == pytest.approx(expected, rel=1e-5)
    return report["coef"]


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_two_compiles_into_one_directory(inputs, tiny_dir, tmp_path, force):
    out = tmp_path / "adapter"
    procs = {coef: _compile(inputs, tiny_dir, out, coef, force) for coef in (2.0, 3.0)}
    results = {coef: (p.wait(timeout=600), p.stderr.read()) for coef, p in procs.items()}
    winners = [coef for coef, (code, _) in results.items() if code == 0]
    if force:
        assert len(winners) >= 1, results  # both may win in turn; a loser says why
    else:
        assert len(winners) == 1, results
    for code, err in results.values():
        if code != 0:
            assert code == 2 and err.strip().splitlines()[-1].startswith("error: "), err
            assert "appeared while this run was writing" in err or "already exists" in err, err
    assert _whole(out) in winners
    assert _leftovers(tmp_path) == []


def test_atomic_outputs_keep_the_users_file_on_error(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("mine")
    with pytest.raises(RuntimeError), atomic_file(path, force=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("failed mid-write")
    assert path.read_text() == "mine" and _leftovers(tmp_path) == []
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "d" / "f").read_text() == "x"
    assert oct((tmp_path / "d").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's owner-only mode
