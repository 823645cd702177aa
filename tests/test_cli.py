"""The CLI end to end on a tiny model: happy path, and one-line errors for bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lora_compile.cli import app
from lora_compile.vectors import SteeringVector, save_vector

runner = CliRunner()


@pytest.fixture()
def texts(tmp_path):
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": f"Calibration sentence number {i} about things."}) for i in range(40)))
    held = tmp_path / "held.jsonl"
    held.write_text(
        json.dumps({"domain": "stories", "text": "Once upon a time there was a fox."})
        + "\n"
        + json.dumps({"domain": "chat", "messages": [{"role": "user", "content": "Tell me a joke."}]})
    )
    return ["--texts", str(cal), "--heldout", str(held)]


def _vector(tmp_path, directions, name="v.safetensors"):
    return str(save_vector(SteeringVector(directions), tmp_path / name))


def _fails(args, tmp_path, match, code=2):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    return err


def test_compile_then_verify(tiny_dir, tmp_path, texts):
    vec = _vector(tmp_path, {1: torch.randn(64), 2: torch.randn(64)})
    out = tmp_path / "adapter"
    result = runner.invoke(
        app,
        ["compile", "-v", vec, "-o", str(out), "--layers", "1,2", "--site", "resid_mid", "--model", tiny_dir, *texts],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compile_report.json").read_text())
    assert [x["layer"] for x in report["layers"]] == [1, 2] and report["site"] == "resid_mid"
    assert (out / "README.md").read_text().startswith("# Steering adapter")
    held = texts[-1]
    ok = runner.invoke(
        app,
        [
            "verify",
            "-a",
            str(out),
            "-v",
            vec,
            "--model",
            tiny_dir,
            "--prompts",
            held,
            "--max-kl-ratio",
            "1e9",
            "--json",
            str(tmp_path / "v.json"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "v.json").read_text())["tokens"] > 0
    strict = runner.invoke(
        app, ["verify", "-a", str(out), "-v", vec, "--model", tiny_dir, "--prompts", held, "--max-kl-ratio", "0"]
    )
    assert strict.exit_code == 1


def test_extract_and_scan(tiny_dir, tmp_path, texts):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"positive": f"good {i}", "negative": f"bad {i}"}) for i in range(4)))
    out = tmp_path / "v.safetensors"
    result = runner.invoke(
        app, ["extract", "--pairs", str(pairs), "--layer", "1-2", "-o", str(out), "--model", tiny_dir]
    )
    assert result.exit_code == 0, result.output
    scan_dir = tmp_path / "scan"
    scan_dir.mkdir()
    result = runner.invoke(app, ["scan", "--model", tiny_dir, "-o", str(scan_dir), *texts])
    assert result.exit_code == 0, result.output
    data = json.loads((scan_dir / "scan.json").read_text())
    assert len(data["sites"]) == 8 and (scan_dir / "scan.png").stat().st_size > 1000
    # with the vector: the value route beside o_proj at its resid_mid layers, printed and in scan.json
    result = runner.invoke(
        app, ["scan", "--model", tiny_dir, "-o", str(scan_dir), "-v", str(out), "--coef", "4", "--force", *texts]
    )
    assert result.exit_code == 0, result.output
    assert "value route" in result.output and "KL ratio ≈" in result.output
    data = json.loads((scan_dir / "scan.json").read_text())
    assert sorted(r["layer"] for r in data["sites"] if "value_route" in r) == [1, 2]
    # and compile with it, printed
    result = runner.invoke(
        app, ["compile", "-v", str(out), "--layers", "1", "--site", "resid_mid", "--route", "both", "--model", tiny_dir,
              "-o", str(tmp_path / "adapter"), *texts],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "value route via model.layers.1.self_attn.v_proj" in result.output and "kept" in result.output


def test_unsupported_architecture(unsupported_dir, tmp_path, texts):
    vec = _vector(tmp_path, {1: torch.randn(32)})
    _fails(
        ["compile", "-v", vec, "-o", str(tmp_path / "out"), "--model", unsupported_dir, *texts],
        tmp_path,
        "unsupported architecture 'bloom'",
    )


def test_extract_methods_from_text_files_then_sweep(tiny_dir, tmp_path):
    (tmp_path / "pos.txt").write_text("".join(f"I am good {i}\n" for i in range(4)))
    (tmp_path / "neg.txt").write_text("".join(f"I am bad {i}\n" for i in range(4)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"positive": "I am good", "negative": "I am bad"}))
    vec = tmp_path / "v.safetensors"
    args = ["--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), "--layer", "1,3"]
    extra = ["--method", "pca_diff", "--position", "mean", "--model", tiny_dir]
    result = runner.invoke(app, ["extract", *args, *extra, "-o", str(vec)])
    assert result.exit_code == 0, result.output
    assert "separability" in result.stdout and "warning: only 4 contrast pairs" in result.stderr
    result = runner.invoke(
        app,
        [
            "sweep",
            "-v",
            str(vec),
            "--layers",
            "3",
            "--coefs=-1,0,2",
            "--pairs",
            str(pairs),
            "--model",
            tiny_dir,
            "-o",
            str(tmp_path / "s.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["coef"] for r in rows] == [-1, 0, 2] and rows[1]["kl"] == 0 and rows[0]["kl"] > 0


def test_compile_for_a_target(tiny_dir, tmp_path, texts):
    vec = _vector(tmp_path, {1: torch.randn(64)})
    out = tmp_path / "adapter"
    base = ["compile", "-v", vec, "--site", "resid_mid", "--model", tiny_dir, *texts]
    result = runner.invoke(app, [*base, "-o", str(out), "--target", "vllm", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "--base-model-id" in result.stderr  # a local model has no hub id
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["base_model_name_or_path"] == tiny_dir
    named = tmp_path / "named"
    result = runner.invoke(app, [*base, "-o", str(named), "--base-model-id", "org/tiny"])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    check = runner.invoke(app, ["check", str(named), "--model", tiny_dir])
    assert check.exit_code == 0, check.output


def test_resid_pre_compile_merge_and_verify_in_two_dtypes(tiny_dir, tmp_path, texts):
    vec = str(save_vector(SteeringVector({0: 2.0 * torch.randn(64)}, "resid_pre"), tmp_path / "pre.safetensors"))
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    result = runner.invoke(
        app, ["compile", "-v", vec, "-o", str(out), "-t", "peft", "--merge", str(merged), "--model", tiny_dir, *texts]
    )
    assert result.exit_code == 0, result.output
    assert "0 (exact)" in result.output and (merged / "config.json").is_file()
    report = json.loads((out / "compile_report.json").read_text())
    assert report["exact"] and report["layers"][0]["fit_error"]["all"]["rms"] == 0.0
    args = ["verify", "-a", str(out), "-v", vec, "--model", tiny_dir, "--prompts", texts[-1], "--generations", "0"]
    ok = runner.invoke(app, [*args, "--dtype", "float32", "--dtype", "bfloat16", "--json", str(tmp_path / "v.json")])
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["dtype"] == "float32" and sorted(data["by_dtype"]) == ["bfloat16", "float32"]
    assert all(v["kl_ratio"] < 1e-6 for v in data["by_dtype"].values()), data["by_dtype"]  # exact in both
    assert "by served dtype" in ok.output
    _fails([*args, "--dtype", "int8"], tmp_path, "unknown dtype 'int8'")
    _fails(["merge", "-a", str(out), "-o", str(merged), "--model", tiny_dir], tmp_path, "already exists")
    # llama.cpp aborts on an embedding LoRA its converter made: refused before converting.
    gguf = ["export-gguf-lora", str(out), "-o", str(tmp_path / "a.gguf"), "--model", tiny_dir]
    _fails(gguf, tmp_path, "is an embedding LoRA (resid_pre 0): llama.cpp aborts on it")


def test_scan_refuses_the_exact_site(tiny_dir, tmp_path, texts):
    args = ["scan", "--model", tiny_dir, "--site", "resid_pre", "-o", str(tmp_path), *texts]
    _fails(args, tmp_path, "nothing to scan")
