"""``compile --refine`` measured: held-out KL ratio before/after per site, and refinement vs training.

The happy/sad vector (extracted on the shipped pairs at every layer's ``resid_post``, as the demo
does) is compiled at each chosen site with ``--refine``, coefficient 4; the compile report's
held-out KL ratios (shipped held-out set, before = the closed form, after = what was kept) are
printed per site with the refinement's steps and time. With ``--train``, the first site is also
trained from PEFT's standard LoRA init (A kaiming-uniform, B = 0) on the same calibration tokens,
validation split and step budget (``refine.train_lora``), and the table gives the time each takes
to reach the closed form's and the refinement's validation KL ratio.

    python scripts/measure_refine.py [--sites resid_post,resid_mid] [--layers 10] [--coef 4] [--train]
        [--route auto] [--rank 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lora_compile import api, progress
from lora_compile.calibrate import calibrate
from lora_compile.corpus import demo_pairs_path
from lora_compile.models import load_model
from lora_compile.refine import RefineOptions, train_lora
from lora_compile.vectors import SteeringVector


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="resid_post,resid_mid")
    parser.add_argument("--layers", default="10")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=RefineOptions.steps)
    parser.add_argument("--lr-scale", type=float, default=RefineOptions.lr_scale, help="refinement's relative rate")
    parser.add_argument("--train", action="store_true", help="also train the first site from PEFT's standard init")
    parser.add_argument("--train-lr", type=float, default=None, help="Adam's lr for the standard init (default 1e-3)")
    parser.add_argument("--rank", type=int, default=1, help="the refined adapter's rank")
    parser.add_argument("--route", default="writer", help="compile's --route (auto: the value route where it wins)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    progress.enable()
    torch.manual_seed(0)
    sites = args.sites.split(",")
    layers = [int(x) for x in args.layers.split(",")]
    options = RefineOptions(steps=args.steps, lr_scale=args.lr_scale, rank=args.rank)

    loaded = load_model(device="cpu")
    vector = api.extract_vector(demo_pairs_path(), layers, loaded)
    samples = api.calibration_samples(loaded)
    keys = [(site, layer) for site in sites for layer in layers]
    start = time.perf_counter()
    calibration = calibrate(loaded, samples, keys)
    print(f"calibration of {len(keys)} site(s): {time.perf_counter() - start:.0f} s")

    rows, results = [], []
    for site, layer in keys:
        at_site = SteeringVector({layer: vector.directions[layer]}, site, dict(vector.metadata))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = api.compile_adapter(
                at_site, Path(tmp) / "a", loaded, coef=args.coef, calibration=calibration, refine=True,
                refine_options=options, route=args.route,
            )  # fmt: skip
            total = time.perf_counter() - start
        refine = result.report["refine"]
        adapters = refine["heldout"]["adapters"]
        results.append({"site": site, "layer": layer, "compile_seconds": total, "refine": refine})
        domains = " · ".join(
            f"{d} {_fmt(adapters['closed_form']['per_domain'][d])} → {_fmt(v)}"
            for d, v in adapters["refined"]["per_domain"].items()
        )
        rows.append(
            f"| {site} {layer} | {_fmt(adapters['closed_form']['kl_ratio'])} | {_fmt(adapters['refined']['kl_ratio'])} "
            f"| {_fmt(refine['kl_ratio_initial'])} → {_fmt(refine['kl_ratio_best'])} | {refine['best_step']}/"
            f"{refine['steps']} | {refine['seconds']:.0f} | {refine['heldout_seconds']:.0f} | {total:.0f} | {domains} |"
        )
        print(rows[-1], flush=True)
    print(
        "\n| site | held-out KL ratio, closed form | refined | validation (calibration split) | best step/steps "
        "| refine s | held-out measure s | compile s | per domain, closed form → refined |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    if args.train:
        site, layer = keys[0]
        at_site = SteeringVector({layer: vector.directions[layer]}, site, dict(vector.metadata))
        refine = results[0]["refine"]
        standard = RefineOptions(steps=args.steps, lr=args.train_lr, patience=args.steps)
        trained = train_lora(loaded, at_site, samples, coef=args.coef, init="standard", options=standard)
        results[0]["standard_init"] = trained.to_dict()
        closed_ratio, refined_ratio = refine["kl_ratio_initial"], refine["kl_ratio_best"]
        refined_time = next(h["seconds"] for h in refine["history"] if h["kl_ratio"] <= refined_ratio)
        print(
            f"\nrefinement vs training from the standard init at {site} {layer} (validation split of the "
            f"calibration text, {refine['train_tokens']} training tokens, {args.steps} steps at most)"
        )
        print(
            "| start | validation KL ratio at step 0 | best | time to the closed form's ratio | "
            "time to the refined ratio |"
        )
        print("|---|---|---|---|---|")
        print(
            f"| closed form + refinement | {_fmt(closed_ratio)} | {_fmt(refined_ratio)} | 0 s (the start) "
            f"| {refined_time:.0f} s (step {refine['best_step']}) |"
        )
        to_closed, to_refined = trained.seconds_to_reach(closed_ratio), trained.seconds_to_reach(refined_ratio)
        print(
            f"| standard init (A kaiming, B = 0) | {_fmt(trained.kl_ratio_initial)} | {_fmt(trained.kl_ratio_best)} "
            f"| {'never' if to_closed is None else f'{to_closed:.0f} s'} "
            f"| {'never' if to_refined is None else f'{to_refined:.0f} s'} |"
        )
        print("history (step, s, ratio):", [(h["step"], round(h["seconds"]), round(h["kl_ratio"], 4))
                                            for h in trained.history])  # fmt: skip
    for r in results:
        h = r["refine"]["history"]
        print(f"{r['site']} {r['layer']} refine history:", [(x["step"], round(x["seconds"]), round(x["kl_ratio"], 4))
                                                          for x in h])  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
