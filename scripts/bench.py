"""One benchmark table, measured in one run, with the machine and device printed.

    python scripts/bench.py [--device cpu|cuda] [--model-dtype bfloat16] [--model DIR] [--rounds 3] [--training]

(1) compile vs the bare forward stopped after the site's layer, over the same calibration tokens
    (the held-out error pass is timed separately); (2) that truncated forward vs the full forward;
    (3) scan of many sites in one pass vs one pass per site; (4) peak memory of compile and scan
    against the model's own weights; (5) with ``--training``, compile vs a rank-1 LoRA trained by
    gradient descent from PEFT's standard init for 10× the compile time; (6) fit error and KL ratio as the
    calibration grows. Timed steps alternate over ``--rounds`` rounds and the median is printed,
    since a shared machine's timings drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_compile import api, corpus
from lora_compile.calibrate import calibrate, encode, stream_writer_inputs
from lora_compile.devices import PeakMemory
from lora_compile.extract import extract, read_pairs
from lora_compile.models import load_model
from lora_compile.refine import RefineOptions, heldout_kl, train_lora
from lora_compile.scan import memory_plan, site_keys
from lora_compile.vectors import SteeringVector


def training_rows(loaded, vec, samples, heldout, coef: float, compile_seconds: float, tmp: Path) -> list:
    """(5) The compiled adapter against a rank-1 LoRA on the same writer trained from PEFT's standard
    init (A kaiming-uniform, B = 0) by Adam on KL(true addition ‖ LoRA), same calibration tokens, for
    10× the compile time. KL ratios on the validation split of the calibration text (what training
    sees) and on the held-out set."""
    budget = 10 * compile_seconds
    # One refinement step: its step-0 evaluation is the closed form's validation KL ratio, and the
    # report has the closed form's factors measured on the held-out set.
    compiled = api.compile_adapter(vec, tmp / "for-training", loaded, coef=coef, refine=True,
                                   refine_options=RefineOptions(steps=1, eval_every=1))  # fmt: skip
    closed_val = compiled.report["refine"]["kl_ratio_initial"]
    closed_held = compiled.report["refine"]["heldout"]["adapters"]["closed_form"]["kl_ratio"]
    options = RefineOptions(steps=100_000, patience=100_000, max_seconds=budget)
    trained = train_lora(loaded, vec, samples, coef=coef, init="standard", options=options)
    held = heldout_kl(loaded, vec, heldout, {"trained": trained.factors}, coef=coef)["adapters"]["trained"]
    reach = trained.seconds_to_reach(closed_val)
    reached = f"{reach:.0f} s = {reach / compile_seconds:.1f}×" if reach is not None else "not in 10× the compile time"
    site = f"{vec.site} {vec.layers[0]}"
    return [
        (f"(5) compile {site} ({compile_seconds:.1f} s): KL ratio, validation split / held-out",
         f"{closed_val:.3g} / {closed_held:.3g}"),
        (f"(5) training from PEFT's standard init, {trained.steps} Adam steps in {trained.seconds:.0f} s "
         "(10× compile): best KL ratio, validation / held-out",
         f"{trained.kl_ratio_best:.3g} / {held['kl_ratio']:.3g}"),
        ("(5) training's time to the compiled adapter's validation KL ratio", reached),
    ]  # fmt: skip


def _sync(loaded) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def _timed(loaded, fn) -> float:
    _sync(loaded)
    start = time.perf_counter()
    fn()
    _sync(loaded)
    return time.perf_counter() - start


def bare_forward(loaded, token_lists, layer: int | None) -> None:
    """The model over the tokens, stopped after ``layer`` (None: the full model with its logits)."""
    if layer is None:
        pad = loaded.tokenizer.pad_token_id
        from lora_compile.calibrate import padded_batches

        with torch.no_grad():
            for _, ids, mask in padded_batches(token_lists, pad, 4096):
                loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
        return
    for _ in stream_writer_inputs(loaded, [("resid_mid", layer)], token_lists):
        pass


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores ({threads} torch threads), torch {torch.__version__}"


def subset(samples, tokens: int, tokenizer) -> list:
    """Samples (shuffled with a fixed seed, domains mixed) until ``tokens`` tokens."""
    order = samples[:]
    random.Random(0).shuffle(order)
    out, n = [], 0
    for s in order:
        if n >= tokens:
            break
        out.append(s)
        n += len(s.token_ids(tokenizer, 512))
    return out


def curve_row(site: str, layer: int, compiled: dict, verified) -> tuple[str, str]:
    tokens = compiled["calibration"]["tokens"]
    error = compiled["predicted_delta_rel_error"]
    return (
        f"(6) {site} {layer}, {tokens} calibration tokens",
        f"fit error {error:.4f}, KL ratio {verified.kl_ratio:.2e}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--site", default="resid_mid")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--curve-layer", type=int, default=10, help="(6): the layer of the token-count curve")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scan-layers", default="0,4,8,12,16,20,24,28", help="(3): layers scanned, both sites")
    parser.add_argument("--scan-tokens", type=int, default=2000, help="(3): calibration tokens for the scan timing")
    parser.add_argument("--curve", default="1000,4000,16000,64000", help="(6): calibration token counts")
    parser.add_argument("--training", action="store_true", help="(5): compile vs training for 10× the compile time")
    parser.add_argument("--skip", default="", help="comma-separated items to skip, e.g. 3,6")
    args = parser.parse_args()
    skip = {int(x) for x in args.skip.split(",") if x}
    loaded = load_model(args.model, args.model_dtype, args.device)
    device = str(loaded.device) + (
        f" ({torch.cuda.get_device_name(loaded.device)})" if loaded.device.type == "cuda" else ""
    )
    print(f"machine: {machine()}")
    print(f"device: {device}; model {loaded.model_id}, {str(loaded.dtype).removeprefix('torch.')}")
    rows: list[tuple[str, str]] = []
    samples = corpus.default_calibration()
    heldout = corpus.default_heldout()
    tokens = encode(loaded, samples)
    held_tokens = encode(loaded, heldout)
    n_cal, n_held = sum(map(len, tokens)), sum(map(len, held_tokens))
    layer, site = args.layer, args.site
    vector = extract(loaded, read_pairs(corpus.demo_pairs_path()), sorted({layer, args.curve_layer}))
    vec = SteeringVector({layer: vector.directions[layer]}, site)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # (1) and (2): alternate bare truncated forward, calibration (+fit: compile without its held-out
        # pass), full forward, and the held-out pass; the median of each over the rounds.
        times: dict[str, list[float]] = {"bare": [], "calibrate": [], "full": [], "heldout": [], "compile": []}
        bare_forward(loaded, tokens[:4], layer)  # warm-up
        for r in range(args.rounds):
            times["bare"].append(_timed(loaded, lambda: bare_forward(loaded, tokens, layer)))
            times["calibrate"].append(_timed(loaded, lambda: calibrate(loaded, samples, [(site, layer)])))
            if 2 not in skip:
                times["full"].append(_timed(loaded, lambda: bare_forward(loaded, tokens, None)))
            times["heldout"].append(_timed(loaded, lambda: bare_forward(loaded, held_tokens, layer)))
            out = tmp / f"compile{r}"
            times["compile"].append(_timed(loaded, lambda o=out: api.compile_adapter(vec, o, loaded, coef=args.coef)))
        med = {k: statistics.median(v) for k, v in times.items() if v}
        rows.append((f"(1) bare forward to layer {layer}, {n_cal} calibration tokens",
                     f"{med['bare']:.2f} s ({n_cal / med['bare']:.0f} tokens/s)"))  # fmt: skip
        rows.append((f"(1) calibrate {site} {layer} (forward + moments + prefix), same tokens",
                     f"{med['calibrate']:.2f} s = {med['calibrate'] / med['bare']:.2f}× bare"))  # fmt: skip
        fit_cost = med["compile"] - med["calibrate"] - med["heldout"]
        rows.append((f"(1) compile {site} {layer}, all of it (calibrate, fit, held-out pass, write)",
                     f"{med['compile']:.2f} s = {med['compile'] / med['bare']:.2f}× bare"))  # fmt: skip
        less = (med["compile"] - med["heldout"]) / med["bare"]
        rows.append((f"(1) of which the held-out pass ({n_held} tokens to layer {layer})",
                     f"{med['heldout']:.2f} s; compile less it: {less:.2f}× bare"))  # fmt: skip
        rows.append(("(1) of which fit + write (compile − calibrate − held-out)", f"{fit_cost:.2f} s"))
        if "full" in med:
            rows.append((f"(2) full forward (all {loaded.num_layers} layers + logits), same tokens",
                         f"{med['full']:.2f} s ({n_cal / med['full']:.0f} tokens/s); truncated = "
                         f"{med['bare'] / med['full']:.2f}× full"))  # fmt: skip
        print(json.dumps({k: [round(x, 3) for x in v] for k, v in times.items()}))

        if 3 not in skip:
            scan_layers = [int(x) for x in args.scan_layers.split(",")]
            keys = site_keys(loaded, None, scan_layers)
            part = subset(samples, args.scan_tokens, loaded.tokenizer)
            one, per = [], []
            for _ in range(args.rounds):
                one.append(_timed(loaded, lambda: calibrate(loaded, part, keys)))
                per.append(_timed(loaded, lambda: [calibrate(loaded, part, [k]) for k in keys]))
            n = sum(map(len, encode(loaded, part)))
            rows.append((f"(3) calibrate {len(keys)} sites (both sites × layers {args.scan_layers}) in one pass, "
                         f"{n} tokens", f"{statistics.median(one):.2f} s"))  # fmt: skip
            rows.append(("(3) the same sites, one pass each",
                         f"{statistics.median(per):.2f} s = {statistics.median(per) / statistics.median(one):.1f}× "
                         "one pass"))  # fmt: skip

        if 4 not in skip:
            weights = memory_plan(loaded, [(site, layer)], [[layer]])["model_weights_bytes"]
            comp = memory_plan(loaded, [(site, layer)], [[layer]])["moments_bytes_all_layers"]
            post = memory_plan(loaded, [("resid_post", layer)], [[layer]])["moments_bytes_all_layers"]
            every = memory_plan(loaded, site_keys(loaded), [list(range(loaded.num_layers))])
            peak = PeakMemory(str(loaded.device)).read()
            rows.append(("(4) model weights", f"{weights / 2**20:.0f} MiB"))
            rows.append((f"(4) moments of compile at {site} / resid_post (one layer)",
                         f"{comp / 2**20:.1f} / {post / 2**20:.1f} MiB"))  # fmt: skip
            rows.append(("(4) moments of a scan of every site, all layers at once",
                         f"{every['moments_bytes_all_layers'] / 2**20:.0f} MiB = "
                         f"{every['moments_bytes_all_layers'] / weights:.1f}× weights"))  # fmt: skip
            rows.append((f"(4) peak so far ({peak.measure})", f"{peak.peak_gib:.2f} GiB"))

        if args.training:
            rows += training_rows(loaded, vec, samples, heldout, args.coef, med["compile"], tmp)

        if 6 not in skip:
            curve_vec = SteeringVector({args.curve_layer: vector.directions[args.curve_layer]}, site)
            for budget in [int(x) for x in args.curve.split(",")]:
                if budget > n_cal:
                    rows.append((f"(6) {budget} calibration tokens",
                                 f"not run: the shipped corpus has {n_cal} tokens"))  # fmt: skip
                    continue
                part = subset(samples, budget, loaded.tokenizer)
                out = tmp / f"curve{budget}"
                res = api.compile_adapter(curve_vec, out, loaded, coef=args.coef, texts=part)
                report = api.verify_adapter(out, curve_vec, loaded, generations=0)
                rows.append(curve_row(site, args.curve_layer, res.report, report))
            res = api.compile_adapter(curve_vec, tmp / "curveall", loaded, coef=args.coef)
            report = api.verify_adapter(tmp / "curveall", curve_vec, loaded, generations=0)
            rows.append(curve_row(site, args.curve_layer, res.report, report))

    width = max(len(a) for a, _ in rows)
    print(f"\n| {'measure'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for a, b in rows:
        print(f"| {a.ljust(width)} | {b} |")


if __name__ == "__main__":
    main()
