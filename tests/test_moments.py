"""Moments files and torchrun: the same adapter bytes from 1 process, 2 ranks, and 2 shard files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_compile import api, corpus
from lora_compile.calibrate import calibrate, calibrate_exact
from lora_compile.cli import EXIT_BAD_INPUT, app
from lora_compile.errors import LoraCompileError
from lora_compile.momentsfile import load_moments, read_header
from lora_compile.vectors import SteeringVector, save_vector

runner = CliRunner()
ADAPTER = "adapter_model.safetensors"


@pytest.fixture()
def long_texts(tmp_path):
    """~13k tokens of plain text: 4 calibration batches, so shards and ranks each get some."""
    words = "the river carried small stones past the mill while the miller counted sacks of grain".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] + str(j % 7) for j in range(160))} for i in range(40)]
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"domain": "stories", "text": "Once upon a time there was a fox who sang."}) + "\n")
    return str(cal), str(held)


def _bytes(adapter_dir) -> bytes:
    return (Path(adapter_dir) / ADAPTER).read_bytes()


def test_fixed_point_sums_match_float64(tiny, long_texts):
    """The exact integer sums agree with a plain float64 sum to float64 rounding, fold included."""
    samples = corpus.read_samples(long_texts[0])
    got = calibrate(tiny, samples, [("resid_post", 1)]).moments[("resid_post", 1)]
    from lora_compile.calibrate import encode, stream_writer_inputs

    gram = torch.zeros_like(got.gram)
    for _, mask, inputs in stream_writer_inputs(tiny, [("resid_post", 1)], encode(tiny, samples)):
        x = inputs[("resid_post", 1)][mask].double()
        gram += x.T @ x
    assert got.count == got.fold.count + (got.count - got.fold.count) > got.fold.count > 0
    assert float((got.gram - gram).abs().max() / gram.abs().max()) < 1e-12


def test_shards_and_files_give_the_same_adapter_bytes(tiny, tmp_path, long_texts):
    cal, held = long_texts
    vec = save_vector(SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(3))}), tmp_path / "v")
    common = {"site": "resid_mid", "heldout": [held]}
    direct = api.compile_adapter(vec, tmp_path / "direct", tiny, texts=[cal], **common)
    header = api.calibrate_moments(tmp_path / "all.st", tiny, sites=["resid_mid"], layers=[1], texts=[cal])
    assert header["batches"] == {"start": 0, "stop": 4, "total": 4}
    shards = [tmp_path / f"shard{i}.st" for i in range(3)]
    for i, path in enumerate(shards):
        api.calibrate_moments(path, tiny, sites=["resid_mid"], layers=[1], texts=[cal], shard=f"{i}/3")
    whole = api.compile_adapter(vec, tmp_path / "whole", tiny, moments=[tmp_path / "all.st"], **common)
    parts = api.compile_adapter(vec, tmp_path / "parts", tiny, moments=list(reversed(shards)), **common)
    assert _bytes(direct.adapter_dir) == _bytes(whole.adapter_dir) == _bytes(parts.adapter_dir)
    assert parts.report["calibration"]["tokens"] == direct.report["calibration"]["tokens"]
    assert parts.report["calibration"]["corpus_hash"] == header["corpus_hash"]
    # The integer sums themselves are equal, not merely close.
    a = load_moments(shards, tiny)[0].moments[("resid_mid", 1)]
    b = calibrate_exact(tiny, corpus.read_samples(cal), [("resid_mid", 1)]).moments[("resid_mid", 1)]
    assert torch.equal(a.gram, b.gram) and torch.equal(a.odd_total, b.odd_total) and a.count == b.count


def test_layer_groups_are_written_one_file_each(tiny, tiny_dir, tmp_path, long_texts):
    """calibrate -o with several layer groups writes each as it is done; --moments takes them together."""
    cal, held = long_texts
    out = tmp_path / "m.safetensors"
    header = api.calibrate_moments(out, tiny, sites=["resid_mid"], layers=[1, 2], texts=[cal], group_layers=1)
    files = [tmp_path / "m.layers-1-1.safetensors", tmp_path / "m.layers-2-2.safetensors"]
    assert header["files"] == [str(f) for f in files] and all(f.exists() for f in files) and not out.exists()
    assert [read_header(f)["layers"] for f in files] == [[1], [2]]
    api.calibrate_moments(tmp_path / "one.st", tiny, sites=["resid_mid"], layers=[1, 2], texts=[cal])
    grouped, single = load_moments(files, tiny)[0], load_moments([tmp_path / "one.st"], tiny)[0]
    assert grouped.tokens == single.tokens and grouped.moments.keys() == single.moments.keys()
    for key, m in single.moments.items():  # the groups together are the one-file calibration, bit for bit
        assert torch.equal(grouped.moments[key].gram, m.gram) and grouped.moments[key].count == m.count
    vec = save_vector(SteeringVector({2: torch.randn(64, generator=torch.Generator().manual_seed(5))}), tmp_path / "v")
    common = {"site": "resid_mid", "heldout": [held]}
    direct = api.compile_adapter(vec, tmp_path / "direct", tiny, texts=[cal], **common)
    from_groups = api.compile_adapter(vec, tmp_path / "groups", tiny, moments=list(reversed(files)), **common)
    assert _bytes(direct.adapter_dir) == _bytes(from_groups.adapter_dir)
    result, _ = api.scan(tiny, moments=files, heldout=[held])
    assert sorted(r["layer"] for r in result["sites"]) == [1, 2]
    with pytest.raises(LoraCompileError, match="share some sites but not all"):
        load_moments([files[0], tmp_path / "one.st"], tiny)
    # the command line says where the groups went
    args = ["calibrate", "-m", tiny_dir, "--site", "resid_mid", "--layers", "1-2", "--group-layers", "1"]
    result = runner.invoke(app, [*args, "--texts", cal, "--device", "cpu", "-o", str(tmp_path / "cli.safetensors")])
    assert result.exit_code == 0, result.output
    assert "2 files, one per layer group" in result.output and (tmp_path / "cli.layers-2-2.safetensors").exists()


def test_moments_files_are_refused_in_one_line(tiny, tiny_tied_dir, tmp_path, long_texts):
    cal, held = long_texts
    path = tmp_path / "m.st"
    api.calibrate_moments(path, tiny, sites=["resid_mid"], layers=[1], texts=[cal])
    api.calibrate_moments(tmp_path / "s0.st", tiny, sites=["resid_mid"], layers=[1], texts=[cal], shard="0/2")
    with pytest.raises(LoraCompileError, match="has no moments for resid_post 1"):
        load_moments([path], tiny, [("resid_post", 1)])
    with pytest.raises(LoraCompileError, match="miss batches 2–4 of 4"):
        load_moments([tmp_path / "s0.st"], tiny)
    with pytest.raises(LoraCompileError, match="overlaps"):
        load_moments([path, tmp_path / "s0.st"], tiny)
    vec = str(save_vector(SteeringVector({1: torch.randn(32)}, "resid_mid"), tmp_path / "v32.safetensors"))
    for args in (
        ["compile", "-v", vec, "-m", tiny_tied_dir, "--moments", str(path), "-o", str(tmp_path / "a")],
        ["scan", "-m", tiny_tied_dir, "--moments", str(path), "-o", str(tmp_path)],
    ):
        result = runner.invoke(app, [*args, "--device", "cpu", "--heldout", held])
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        assert "holds moments of another model" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    with pytest.raises(LoraCompileError, match="shard"):
        api.parse_shard("2/2")


def test_torchrun_two_ranks_give_the_one_process_adapter(smol, tmp_path):
    """2 processes (torchrun, gloo) split the calibration batches and all-reduce: the same adapter bytes."""
    samples = corpus.default_calibration()[:40]  # ~10k tokens: 3 batches, layer 2 only
    cal, held = tmp_path / "cal.jsonl", tmp_path / "held.jsonl"
    for path, chosen in ((cal, samples), (held, corpus.default_heldout()[:3])):
        rows = [json.dumps({"domain": s.domain, "text": s.render(smol.tokenizer)}) + "\n" for s in chosen]
        path.write_text("".join(rows))
    vec = save_vector(SteeringVector({2: torch.randn(576, generator=torch.Generator().manual_seed(2))}), tmp_path / "v")
    args = ["--site", "resid_mid", "--texts", str(cal), "--heldout", str(held), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_COMPILE_PROGRESS": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "lora_compile.cli", "compile", "-v", str(vec), "-o", str(tmp_path / "two"), *args]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs: the same kernels, the same bits
    try:
        one = api.compile_adapter(vec, tmp_path / "one", smol, site="resid_mid", texts=[str(cal)], heldout=[str(held)])
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "two" / "compile_report.json").read_text())
    assert two["calibration"]["tokens"] == one.report["calibration"]["tokens"] > 8192
    assert _bytes(tmp_path / "two") == _bytes(one.adapter_dir)
