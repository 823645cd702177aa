"""The bad-input battery: every command, one table. Each case must end with one ``error:`` line,
its documented exit code (2: bad input or an unreadable/unwritable file; README "Exit codes"),
no traceback, and the working directory exactly as it was (no file added, none changed).

Inputs are made fresh for every case in a directory ``w``; ``{w}`` and ``{tiny}`` (a tiny random
Llama, d = 64, 4 layers) are filled into the arguments. A pickled ``adapter_model.bin`` that would
create ``w/PWNED`` when unpickled proves that no command ever unpickles it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_compile.cli import EXIT_BAD_INPUT, app
from lora_compile.vectors import SteeringVector, save_vector

runner = CliRunner()
D = 64  # the tiny model's hidden size

# (case id, command line, message fragment). Every case exits EXIT_BAD_INPUT.
CASES = [
    # compile: the vector file
    ("compile-missing-vector", ["compile", "-v", "{w}/none.safetensors", "-o", "{w}/out"], "does not exist"),
    ("compile-text-as-safetensors", ["compile", "-v", "{w}/text.safetensors", "-o", "{w}/out"], "not a readable"),
    ("compile-empty-safetensors", ["compile", "-v", "{w}/empty.safetensors", "-o", "{w}/out"], "not a readable"),
    (
        "compile-truncated-safetensors",
        ["compile", "-v", "{w}/truncated.safetensors", "-o", "{w}/out"],
        "not a readable",
    ),
    ("compile-wrong-tensor-names", ["compile", "-v", "{w}/names.safetensors", "-o", "{w}/out"], "no direction.N"),
    ("compile-integer-vector", ["compile", "-v", "{w}/int.safetensors", "-o", "{w}/out"], "floating point"),
    ("compile-matrix-vector", ["compile", "-v", "{w}/matrix.safetensors", "-o", "{w}/out"], "has shape (2, 64)"),
    ("compile-nan-vector", ["compile", "-v", "{w}/nan.safetensors", "-o", "{w}/out"], "NaN or infinite"),
    ("compile-inf-vector", ["compile", "-v", "{w}/inf.safetensors", "-o", "{w}/out"], "NaN or infinite"),
    (
        "compile-1e30-vector",
        ["compile", "-v", "{w}/1e30.safetensors", "-o", "{w}/out"],
        "norm of direction.1 overflows float32",
    ),
    ("compile-wrong-size", ["compile", "-v", "{w}/d576.safetensors", "-o", "{w}/out"], "hidden size 64"),
    (
        "compile-float16-overflow",
        ["compile", "-v", "{w}/1e12.safetensors", "-o", "{w}/out", "--dtype", "float16", "--texts", "{w}/cal.jsonl"],
        "overflows float16",
    ),
    # compile: the request
    (
        "compile-unknown-site",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--site", "resid_in"],
        "unknown site",
    ),
    (
        "compile-layers-descending",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--layers", "3-1"],
        "empty range 3-1",
    ),
    (
        "compile-layers-negative",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--layers", "-1"],
        "layer numbers start at 0",
    ),
    (
        "compile-layers-text",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--layers", "abc"],
        "cannot read layers",
    ),
    (
        "compile-layer-out-of-range",
        ["compile", "-v", "{w}/layer9.safetensors", "-o", "{w}/out"],
        "layer 9 is out of range",
    ),
    (
        "compile-coef-nan",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--coef", "nan"],
        "not a finite number",
    ),
    (
        "compile-unknown-target",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "-t", "vllm2"],
        "unknown target",
    ),
    (
        "compile-unknown-dtype",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--dtype", "float8"],
        "unknown dtype",
    ),
    (
        "compile-no-direction-for-layer",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--layers", "3"],
        "no direction for layer",
    ),
    (
        "compile-resid-pre-beyond-layer-0",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--site", "resid_pre", "-t", "peft"],
        "exists only at layer(s) 0",
    ),
    (
        "compile-unknown-direction-method",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--direction", "pca"],
        "unknown direction method",
    ),
    (
        "compile-missing-model",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--model", "{w}/m.gguf"],
        "does not exist",
    ),
    # compile: the outputs
    ("compile-existing-output", ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/adapter"], "already exists"),
    ("compile-missing-parent", ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/no/out"], "does not exist"),
    (
        "compile-read-only-parent",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "/sys/kernel/out"],
        "cannot write in /sys/kernel",
    ),
    (
        "compile-parent-is-a-file",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/text.safetensors/out"],
        "is not a directory",
    ),
    (
        "compile-merge-exists",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--merge", "{w}/adapter"],
        "already exists",
    ),
    # compile: the texts
    (
        "compile-empty-calibration",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--texts", "{w}/blank.txt"],
        "holds no text",
    ),
    (
        "compile-empty-heldout",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--heldout", "{w}/blank.txt"],
        "holds no text",
    ),
    (
        "compile-malformed-jsonl",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--texts", "{w}/broken.jsonl"],
        "broken.jsonl:2: not valid JSON",
    ),
    (
        "compile-jsonl-without-text",
        ["compile", "-v", "{w}/vec.safetensors", "-o", "{w}/out", "--texts", "{w}/pairs.jsonl"],
        "needs a 'text' string",
    ),
    # verify
    ("verify-missing-adapter", ["verify", "-a", "{w}/none", "-v", "{w}/vec.safetensors"], "not an adapter directory"),
    (
        "verify-pickle-adapter",
        ["verify", "-a", "{w}/pickled", "-v", "{w}/vec.safetensors"],
        "no adapter_model.safetensors",
    ),
    ("verify-nan-vector", ["verify", "-a", "{w}/adapter", "-v", "{w}/nan.safetensors"], "NaN or infinite"),
    (
        "verify-unknown-dtype",
        ["verify", "-a", "{w}/adapter", "-v", "{w}/vec.safetensors", "--dtype", "int8"],
        "unknown dtype",
    ),
    (
        "verify-json-exists",
        ["verify", "-a", "{w}/adapter", "-v", "{w}/vec.safetensors", "--json", "{w}/pairs.jsonl"],
        "already exists",
    ),
    (
        "verify-empty-prompts",
        ["verify", "-a", "{w}/adapter", "-v", "{w}/vec.safetensors", "--prompts", "{w}/blank.txt"],
        "holds no text",
    ),
    # scan
    ("scan-missing-output-dir", ["scan", "-o", "{w}/no"], "does not exist"),
    ("scan-layer-out-of-range", ["scan", "-o", "{w}", "--layers", "4"], "layer 4 is out of range"),
    ("scan-unknown-site", ["scan", "-o", "{w}", "--site", "resid_in"], "site 'resid_in' is not supported"),
    ("scan-existing-json", ["scan", "-o", "{w}/scanned"], "already exists"),
    # extract
    (
        "extract-malformed-pairs",
        ["extract", "--pairs", "{w}/broken.jsonl", "--layer", "1", "-o", "{w}/v.safetensors"],
        "broken.jsonl:2: not valid JSON",
    ),
    (
        "extract-pairs-missing-field",
        ["extract", "--pairs", "{w}/cal.jsonl", "--layer", "1", "-o", "{w}/v.safetensors"],
        "'positive' and 'negative'",
    ),
    (
        "extract-empty-pairs",
        ["extract", "--pairs", "{w}/blank.txt", "--layer", "1", "-o", "{w}/v.safetensors"],
        "holds no contrast pairs",
    ),
    (
        "extract-layers-descending",
        ["extract", "--pairs", "{w}/pairs.jsonl", "--layer", "2-1", "-o", "{w}/v.safetensors"],
        "empty range 2-1",
    ),
    (
        "extract-layers-text",
        ["extract", "--pairs", "{w}/pairs.jsonl", "--layer", "a-b", "-o", "{w}/v.safetensors"],
        "cannot read layers",
    ),
    (
        "extract-layer-out-of-range",
        ["extract", "--pairs", "{w}/pairs.jsonl", "--layer", "7", "-o", "{w}/v.safetensors"],
        "layer 7 is out of range",
    ),
    (
        "extract-unknown-method",
        ["extract", "--pairs", "{w}/pairs.jsonl", "--layer", "1", "--method", "pca", "-o", "{w}/v.safetensors"],
        "unknown extraction method",
    ),
    (
        "extract-unknown-position",
        ["extract", "--pairs", "{w}/pairs.jsonl", "--layer", "1", "--position", "first", "-o", "{w}/v.safetensors"],
        "unknown token position",
    ),
    (
        "extract-unpaired-texts",
        [
            "extract",
            "--positive",
            "{w}/three.txt",
            "--negative",
            "{w}/two.txt",
            "--layer",
            "1",
            "-o",
            "{w}/v.safetensors",
        ],
        "has 3 texts but",
    ),
    (
        "extract-positive-alone",
        ["extract", "--positive", "{w}/blank.txt", "--layer", "1", "-o", "{w}/v.safetensors"],
        "give both --positive and --negative",
    ),
    # sweep
    (
        "sweep-bad-coefficients",
        ["sweep", "-v", "{w}/vec.safetensors", "--coefs", "1,x", "-o", "{w}/s.png"],
        "cannot read coefficients",
    ),
    (
        "sweep-infinite-coefficient",
        ["sweep", "-v", "{w}/vec.safetensors", "--coefs", "1,inf", "-o", "{w}/s.png"],
        "non-finite",
    ),
    (
        "sweep-no-direction-for-layer",
        ["sweep", "-v", "{w}/vec.safetensors", "--layers", "3", "-o", "{w}/s.png"],
        "no direction for layer",
    ),
    ("sweep-existing-plot", ["sweep", "-v", "{w}/vec.safetensors", "-o", "{w}/text.safetensors"], "already exists"),
    # import
    ("import-text-as-gguf", ["import", "{w}/text.gguf", "-o", "{w}/v.safetensors"], "not a readable GGUF file"),
    (
        "import-truncated-safetensors",
        ["import", "{w}/truncated.safetensors", "--layer", "1", "-o", "{w}/v.safetensors"],
        "not a readable",
    ),
    ("import-npy-without-layer", ["import", "{w}/v.npy", "-o", "{w}/v.safetensors"], "pass --layer"),
    (
        "import-1e30-npy",
        ["import", "{w}/1e30.npy", "--layer", "1", "-o", "{w}/v.safetensors"],
        "norm of direction.1 overflows float32",
    ),
    ("import-unknown-format", ["import", "{w}/v.npy", "--format", "onnx", "-o", "{w}/v.safetensors"], "unknown format"),
    # export
    ("export-resid-mid", ["export", "{w}/mid.safetensors", "-o", "{w}/v.gguf"], "resid_mid"),
    ("export-existing", ["export", "{w}/vec.safetensors", "-o", "{w}/text.gguf"], "already exists"),
    ("export-corrupt-vector", ["export", "{w}/text.safetensors", "-o", "{w}/v.gguf"], "not a readable"),
    # check
    ("check-not-an-adapter", ["check", "{w}"], "not an adapter directory"),
    ("check-config-not-json", ["check", "{w}/badconfig"], "is not valid JSON"),
    ("check-pickle-adapter", ["check", "{w}/pickled"], "no adapter_model.safetensors"),
    ("check-unknown-target", ["check", "{w}/adapter", "-t", "vllm2"], "unknown target"),
    # merge
    ("merge-pickle-adapter", ["merge", "-a", "{w}/pickled", "-o", "{w}/merged"], "no adapter_model.safetensors"),
    ("merge-existing-output", ["merge", "-a", "{w}/adapter", "-o", "{w}/scanned"], "already exists"),
    ("merge-corrupt-weights", ["merge", "-a", "{w}/badweights", "-o", "{w}/merged"], "cannot read"),
]
# Commands that load a model get the tiny one (the embedded model would only slow the battery down).
TAKES_MODEL = {"compile", "verify", "scan", "extract", "sweep", "merge"}


class _Pwned:
    """Unpickling this creates a marker file: proof that nobody unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def good_adapter(tiny_dir, tmp_path_factory):
    """A real adapter compiled on the tiny model, copied into each case's directory."""
    d = tmp_path_factory.mktemp("battery-adapter")
    vec = save_vector(SteeringVector({1: torch.randn(D, generator=torch.Generator().manual_seed(1))}), d / "v.st")
    cal = d / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": f"Calibration sentence {i} about things."}) for i in range(20)))
    args = ["compile", "-v", str(vec), "-o", str(d / "adapter"), "--model", tiny_dir, "--texts", str(cal)]
    result = runner.invoke(app, [*args, "--heldout", str(cal)])
    assert result.exit_code == 0, result.output
    return d / "adapter"


@pytest.fixture()
def w(tmp_path, good_adapter):
    """Every input the battery needs, made fresh for each case."""
    d = tmp_path / "w"
    d.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, directions in {
        "vec": {1: torch.randn(D, generator=gen), 2: torch.randn(D, generator=gen)},
        "nan": {1: torch.full((D,), float("nan"))},
        "inf": {1: torch.full((D,), float("inf"))},
        "1e30": {1: torch.full((D,), 1e30)},
        "1e12": {1: torch.full((D,), 1e12)},
        "d576": {1: torch.randn(576, generator=gen)},
        "layer9": {9: torch.randn(D, generator=gen)},
        "matrix": {1: torch.randn(2, D, generator=gen)},
    }.items():
        save_file({f"direction.{k}": v for k, v in directions.items()}, str(d / f"{name}.safetensors"))
    save_vector(SteeringVector({1: torch.randn(D, generator=gen)}, "resid_mid"), d / "mid.safetensors")
    save_file({"direction.1": torch.ones(D, dtype=torch.int64)}, str(d / "int.safetensors"))
    save_file({"steer": torch.ones(D)}, str(d / "names.safetensors"))
    good = (d / "vec.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "text.safetensors").write_text("direction.1 = [1, 2, 3]\n")
    (d / "text.gguf").write_text("not a gguf file\n")
    np.save(d / "v.npy", np.ones(D, np.float32))
    np.save(d / "1e30.npy", np.full(D, 1e30, np.float32))
    (d / "blank.txt").write_text("\n\n   \n")
    (d / "three.txt").write_text("I am good\nI am glad\nI am fine\n")
    (d / "two.txt").write_text("I am bad\nI am sad\n")
    (d / "cal.jsonl").write_text("\n".join(json.dumps({"text": f"Some text number {i}."}) for i in range(8)))
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no closing quote}\n')
    (d / "pairs.jsonl").write_text(json.dumps({"positive": "I am glad", "negative": "I am sad"}) + "\n")
    shutil.copytree(good_adapter, d / "adapter")
    pickled = d / "pickled"
    pickled.mkdir()
    shutil.copy(good_adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Pwned(str(d / "PWNED"))}))
    bad_config = d / "badconfig"
    shutil.copytree(good_adapter, bad_config)
    (bad_config / "adapter_config.json").write_text("{r: 1,")
    bad_weights = d / "badweights"
    shutil.copytree(good_adapter, bad_weights)
    (bad_weights / "adapter_model.safetensors").write_text("not tensors")
    (d / "scanned").mkdir()
    (d / "scanned" / "scan.json").write_text("{}")
    return d


def _snapshot(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case, args, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, args, match, w, tiny_dir):
    argv = [a.format(w=w) for a in args]
    if argv[0] in TAKES_MODEL and "--model" not in argv:
        argv += ["--model", tiny_dir]
    before = _snapshot(w.parent)
    result = runner.invoke(app, argv)
    assert result.exit_code == EXIT_BAD_INPUT, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors and errors[-1].startswith("error: ") and match in errors[-1], result.stderr
    assert sum(line.startswith("error:") for line in errors) == 1, result.stderr
    assert _snapshot(w.parent) == before  # nothing written, nothing changed, nothing unpickled
    assert not (w / "PWNED").exists()


def test_the_battery_covers_every_command():
    commands = {args[0] for _, args, _ in CASES}
    assert commands == {"compile", "verify", "scan", "extract", "sweep", "import", "export", "check", "merge"}
    assert len(CASES) >= 30
