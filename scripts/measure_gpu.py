"""GPU figures for the README: every pass on CUDA in bfloat16, and what a Llama-3-8B-shaped model costs.

Two parts, printed and written to ``--out`` as JSON. ``--tokenizer`` is a saved copy of the
embedded model's tokenizer (the GGUF itself is too large to carry to a GPU machine), made where
the embedded model is installed: ``lc.load_model(device="cpu").tokenizer.save_pretrained(DIR)``.

``wiring``: a randomly initialised twin of the embedded SmolLM2-135M (its shipped config, the
tokenizer from ``--tokenizer``), run through the command line with ``--device cuda --model-dtype
bfloat16``: extract, compile, scan, verify, sweep, merge; and the same compile on the CPU in
bfloat16 and float32 beside it.

``llama8b``: a randomly initialised Llama-3-8B-shaped model in bfloat16, built from its config on
the GPU (no weights downloaded: it measures cost, not fidelity), through the Python API on the
shipped calibration corpus: a forward pass stopped after layer 16 (nothing accumulated), compile at
``resid_mid 16`` and ``resid_post 16``, a scan of every site and layer (layer groups planned from
free memory), then verify in bfloat16. Times are wall clock with the GPU synchronised; memory is
``torch.cuda.max_memory_allocated`` per step.

    python scripts/measure_gpu.py --tokenizer smol-tokenizer/ --out gpu.json
    python scripts/measure_gpu.py --tokenizer smol-tokenizer/ --parts llama8b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def _cli(args: list[str], env: dict) -> tuple[int, float, str]:
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "lora_compile.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return proc.returncode, time.time() - start, (proc.stdout + proc.stderr)[-1500:]


def wiring(tokenizer_dir: Path, work: Path) -> dict:
    """The CLI passes on a random SmolLM2 twin, on CUDA in bfloat16 (and compile on the CPU beside it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_compile.models import EMBEDDED_CONFIG

    torch.manual_seed(0)
    config = AutoConfig.for_model(**json.loads(EMBEDDED_CONFIG.read_text()))
    twin = work / "smol-twin"
    AutoModelForCausalLM.from_config(config).save_pretrained(twin)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(twin)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pairs = str(ROOT / "lora_compile" / "data" / "pairs_happy_sad.jsonl")
    vec, out = str(work / "v.safetensors"), work / "out"
    gpu = ["--model", str(twin), "--device", "cuda", "--model-dtype", "bfloat16"]
    compile_args = ["compile", "-v", vec, "--layers", "18", "--site", "resid_mid", "--coef", "4"]
    steps = {
        "extract": ["extract", "--pairs", pairs, "--layer", "10,18", "-o", vec, *gpu],
        "compile": [*compile_args, "-o", f"{out}-cuda", *gpu],
        "scan": ["scan", "-o", str(work), *gpu],
        "verify": ["verify", "-a", f"{out}-cuda", "-v", vec, "--dtype", "bfloat16", "--max-kl-ratio", "1e9", *gpu],
        "sweep": ["sweep", "-v", vec, "--layers", "10", "--coefs", "0,4", "-o", str(work / "sweep.png"), *gpu],
        "merge": ["merge", "-a", f"{out}-cuda", "-o", str(work / "merged"), *gpu],
    }
    for dtype in ("bfloat16", "float32"):
        cpu = ["--model", str(twin), "--device", "cpu", "--model-dtype", dtype]
        steps[f"compile cpu {dtype}"] = [*compile_args, "-o", f"{out}-cpu-{dtype}", *cpu]
    results = {}
    for name, args in steps.items():
        code, seconds, tail = _cli(args, env)
        results[name] = {"exit": code, "seconds": round(seconds, 1), "tail": tail if code else tail[-400:]}
        print(f"{name}: exit {code}, {seconds:.1f} s\n{tail[-600:]}", flush=True)
    fits = {}
    for name, directory in (("cuda bfloat16", f"{out}-cuda"), ("cpu bfloat16", f"{out}-cpu-bfloat16")):
        report_path = Path(directory) / "compile_report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            fits[name] = {"fit_rms": report["layers"][0]["fit_error"]["all"]["rms"], "memory": report["memory"]}
    report_path = Path(f"{out}-cpu-float32") / "compile_report.json"
    if report_path.is_file():
        fits["cpu float32"] = {"fit_rms": json.loads(report_path.read_text())["layers"][0]["fit_error"]["all"]["rms"]}
    results["fit_error_resid_mid_18"] = fits
    return results


def _timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    value = fn()
    torch.cuda.synchronize()
    return value, time.time() - start, torch.cuda.max_memory_allocated() / GIB


def batch_gram_costs(loaded, token_lists) -> dict:
    """One batch's ``xᵀx`` of the layer-16 ``down_proj`` input three ways: time, and error against float64."""
    from lora_compile.calibrate import stream_writer_inputs

    batches = stream_writer_inputs(loaded, [("resid_post", 16)], token_lists, "one batch")
    _, mask, inputs = next(batches)
    batches.close()
    x = inputs[("resid_post", 16)]
    x = x[mask.to(x.device)]
    exact = x.double().T @ x.double()
    ways = {
        "float64": lambda: x.double().T @ x.double(),
        "float32 (TF32 off)": lambda: x.float().T @ x.float(),
        "bfloat16 tensor cores, float32 accumulation": lambda: torch.mm(x.T, x, out_dtype=torch.float32),
    }
    costs = {"tokens": int(x.shape[0]), "d": int(x.shape[1])}
    for name, product in ways.items():
        product()
        _, seconds, _ = _timed(lambda p=product: [p() for _ in range(5)])
        err = float((product().double() - exact).norm() / exact.norm())
        costs[name] = {"ms": round(seconds / 5 * 1000, 2), "relative_error_vs_float64": err}
    return costs


def llama8b(tokenizer_dir: Path, work: Path, group_layers: int | None) -> dict:
    """Compile and scan costs of a random Llama-3-8B-shaped model in bfloat16 on the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    import lora_compile as lc
    from lora_compile.architectures import architecture_for
    from lora_compile.calibrate import calibrate, encode, stream_writer_inputs
    from lora_compile.models import LoadedModel
    from lora_compile.vectors import SteeringVector

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    start = time.time()
    with torch.device("cuda"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    net.eval().requires_grad_(False)
    torch.cuda.synchronize()
    built = time.time() - start
    loaded = LoadedModel(net, tok, architecture_for("llama"), "llama-3-8b-shaped", "random/llama-3-8b-shaped")
    weights = sum(p.numel() * p.element_size() for p in net.parameters()) / GIB
    out: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "Llama-3-8B shape, random init, bfloat16",
        "weights_gib": round(weights, 2),
        "build_seconds": round(built, 1),
    }
    print(json.dumps(out), flush=True)
    samples = lc.api.calibration_samples(loaded)
    token_lists = encode(loaded, samples)
    out["calibration_tokens"] = sum(len(t) for t in token_lists)

    def bare():
        for _ in stream_writer_inputs(loaded, [("resid_mid", 16)], token_lists, "forward to layer 16"):
            pass

    bare()  # warm-up: kernels chosen, allocator filled
    _, seconds, peak = _timed(bare)
    out["forward_to_layer_16"] = {
        "seconds": round(seconds, 2),
        "tokens_per_s": round(out["calibration_tokens"] / seconds),
    }
    out["batch_gram_down_proj_16"] = batch_gram_costs(loaded, token_lists)
    print("batch gram", json.dumps(out["batch_gram_down_proj_16"]), flush=True)
    vectors = {}
    for site in ("resid_mid", "resid_post"):
        _, seconds, peak = _timed(lambda site=site: calibrate(loaded, samples, [(site, 16)]))
        out[f"calibrate {site} 16"] = {"seconds": round(seconds, 2), "peak_gib": round(peak, 2)}
        torch.manual_seed(1)
        vector = vectors[site] = SteeringVector({16: torch.randn(4096) * 2.0}, site)
        result, seconds, peak = _timed(
            lambda v=vector, s=site: lc.compile_adapter(v, work / f"adapter-{s}", loaded, coef=1.0, force=True)
        )
        out[f"compile {site} 16"] = {
            "seconds": round(seconds, 2),
            "peak_gib": round(peak, 2),
            "fit_rms": result.report["layers"][0]["fit_error"]["all"]["rms"],
        }
        print(site, json.dumps(out[f"compile {site} 16"]), flush=True)
    (result, _), seconds, peak = _timed(lambda: lc.scan(loaded, group_layers=group_layers))
    memory = result["memory"]
    out["scan all sites, 32 layers"] = {
        "seconds": round(seconds, 1),
        "peak_gib": round(peak, 2),
        "layer_groups": [[g[0], g[-1]] for g in memory["layer_groups"]],
        "moments_gib_largest_group": round(memory["moments_bytes_largest_group"] / GIB, 2),
        "moments_gib_all_layers": round(memory["moments_bytes_all_layers"] / GIB, 2),
        "recommended": result["recommended"][:1],
    }
    print("scan", json.dumps(out["scan all sites, 32 layers"]), flush=True)
    try:
        report, seconds, peak = _timed(
            lambda: lc.verify_adapter(
                work / "adapter-resid_mid", vectors["resid_mid"], loaded, generations=1, dtype="bfloat16"
            )
        )  # fmt: skip
        out["verify bfloat16 (with its float32 reference copy)"] = {
            "seconds": round(seconds, 1),
            "peak_gib": round(peak, 2),
            "tokens": report.tokens,
        }
    except torch.OutOfMemoryError as exc:
        out["verify bfloat16 (with its float32 reference copy)"] = {"error": str(exc).splitlines()[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a saved copy of the embedded tokenizer")
    parser.add_argument("--parts", nargs="+", default=["wiring", "llama8b"], choices=["wiring", "llama8b"])
    parser.add_argument("--group-layers", type=int, help="scan's layers per group (default: planned)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device: these figures need a GPU")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "wiring" in args.parts:
            figures["wiring"] = wiring(args.tokenizer, Path(tmp))
        if "llama8b" in args.parts:
            figures["llama8b"] = llama8b(args.tokenizer, Path(tmp), args.group_layers)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
