"""``compile --refine`` measured: held-out KL ratio before/after per site, and refinement vs training.

The happy/sad vector (extracted on the shipped pairs at every layer's ``resid_post``, as the demo
does) is compiled at each chosen site with ``--refine``, coefficient 4 (``--route`` applies at
``resid_mid``, ``--post-route`` at ``resid_post``); the compile report's held-out KL ratios
(shipped held-out set: before = the writer's closed form, the closed form kept by the route,
after = what was kept) are printed per site with the refinement's steps and time, then medians
over the sites (``--layers all``: every layer; with ``--json`` a long run resumes where it
stopped). With ``--train``, the first site is also trained from PEFT's standard LoRA init (A
kaiming-uniform, B = 0) on the same calibration tokens, validation split and step budget
(``refine.train_lora``), and the table gives the time each takes to reach the closed form's and
the refinement's validation KL ratio.

    python scripts/measure_refine.py [--sites resid_post,resid_mid] [--layers 10|all] [--coef 4] [--train]
        [--route auto] [--post-route next_layer] [--rank 1] [--json FILE]
    python scripts/measure_refine.py --json FILE --table [--readme README.md]   # FILE's table, nothing run

``--readme``: the table and its summary also replace what lies between the README's
``<!-- every-site start -->`` and ``<!-- every-site end -->`` lines.
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


def _kl_ratios(result: dict) -> tuple[float, float, float]:
    """Held-out KL ratio of the writer's closed form (before), of the closed form kept, and of the adapter kept."""
    refine = result["refine"]
    adapters = refine["heldout"]["adapters"]
    closed = adapters["closed_form"]["kl_ratio"]
    return (
        adapters.get("writer_only", adapters["closed_form"])["kl_ratio"],
        closed,
        adapters[refine["kept"]]["kl_ratio"],
    )


def _row(result: dict) -> str:
    refine = result["refine"]
    adapters = refine["heldout"]["adapters"]
    before, closed, after = _kl_ratios(result)
    per_domain = adapters[refine["kept"]]["per_domain"]
    worst = max(per_domain, key=per_domain.get)
    return (
        f"| {result['site']} {result['layer']} | {_fmt(before)} | {_fmt(closed)} ({result.get('route', 'writer')}) "
        f"| {_fmt(adapters['refined']['kl_ratio'])} | {_fmt(after)} ({refine['kept'].replace('_', ' ')}) "
        f"| {refine['best_step']}/{refine['steps']} | {refine['seconds']:.0f} | {result['compile_seconds']:.0f} "
        f"| {worst} {_fmt(per_domain[worst])} |"
    )


TABLE_HEADER = (
    "| site | held-out KL ratio: writer's closed form (before) | closed form kept (route) | refined "
    "| after (kept) | best step/steps | refine s | compile s | worst domain, after |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _median(x: torch.Tensor) -> float:
    """The median, the mean of the two middle values of an even count (``Tensor.median`` takes the lower)."""
    return float(torch.quantile(x, 0.5))


def _summary(rows: list[dict]) -> list[str]:
    """Median before/after over the sites measured, how many reach 0.005, and the worst after/before."""
    if not rows:
        return []
    before, _, after = (torch.tensor(x, dtype=torch.float64) for x in zip(*(_kl_ratios(r) for r in rows)))
    worst = int(torch.argmax(after / before))
    lines = [
        f"{len(rows)} site(s): median held-out KL ratio {_fmt(_median(before))} (writer's closed form) → "
        f"{_fmt(_median(after))} (kept); sites ≤ 0.005: {int((before <= 0.005).sum())} → "
        f"{int((after <= 0.005).sum())}; "
        f"largest after/before {float(after[worst] / before[worst]):.3g} ({rows[worst]['site']} {rows[worst]['layer']})"
    ]
    for site in sorted({r["site"] for r in rows}):
        sub = [i for i, r in enumerate(rows) if r["site"] == site]
        lines.append(f"{site}: median {_fmt(_median(before[sub]))} → {_fmt(_median(after[sub]))}")
    return lines


README_MARKERS = ("<!-- every-site start -->\n", "<!-- every-site end -->\n")


def _write_readme(path: Path, table: str, summary: list[str]) -> None:
    """``table`` and ``summary`` (as a list) between the README's every-site markers."""
    text = path.read_text()
    start, end = README_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{path} needs one {start.strip()} line before one {end.strip()} line")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    body = table + "\n\n" + "".join(f"- {line}\n" for line in summary)
    path.write_text(head + start + body + end + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="resid_post,resid_mid")
    parser.add_argument("--layers", default="10", help="comma-separated, or all")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=RefineOptions.steps)
    parser.add_argument("--lr-scale", type=float, default=RefineOptions.lr_scale, help="refinement's relative rate")
    parser.add_argument("--train", action="store_true", help="also train the first site from PEFT's standard init")
    parser.add_argument("--train-lr", type=float, default=None, help="Adam's lr for the standard init (default 1e-3)")
    parser.add_argument("--rank", type=int, default=1, help="the refined adapter's rank")
    parser.add_argument(
        "--route", default="writer", help="compile's --route at resid_mid (auto: the value route where it wins)"
    )
    parser.add_argument(
        "--post-route", default="writer", help="compile's --route at resid_post (next_layer: through layer L+1)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="every number, written after each site; sites already in it are skipped"
    )
    parser.add_argument("--table", action="store_true", help="print the table of the sites in --json; run nothing")
    parser.add_argument("--readme", type=Path, default=None, help="with --table: also write it into this README")
    args = parser.parse_args()
    if args.table:
        if args.json is None or not args.json.exists():
            raise SystemExit("--table prints the sites of an existing --json FILE: give one")
        rows = sorted(json.loads(args.json.read_text()), key=lambda r: (r["site"], r["layer"]))
        table, summary = TABLE_HEADER + "\n" + "\n".join(_row(r) for r in rows), _summary(rows)
        print(table + "\n\n" + "\n".join(summary))
        if args.readme is not None:
            _write_readme(args.readme, table, summary)
        return
    progress.enable()
    torch.manual_seed(0)
    sites = args.sites.split(",")
    loaded = load_model(device="cpu")
    layers = list(range(loaded.num_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    options = RefineOptions(steps=args.steps, lr_scale=args.lr_scale, rank=args.rank)

    vector = api.extract_vector(demo_pairs_path(), layers, loaded)
    samples = api.calibration_samples(loaded)
    keys = [(site, layer) for site in sites for layer in layers]

    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["site"], r["layer"]) for r in results}
    todo = [k for k in keys if k not in done]
    if todo:
        start = time.perf_counter()
        calibration = calibrate(loaded, samples, todo)
        print(f"calibration of {len(todo)} site(s): {time.perf_counter() - start:.0f} s")
    for site, layer in todo:
        at_site = SteeringVector({layer: vector.directions[layer]}, site, dict(vector.metadata))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = api.compile_adapter(
                at_site, Path(tmp) / "a", loaded, coef=args.coef, calibration=calibration, refine=True,
                refine_options=options, route=args.route if site == "resid_mid" else args.post_route,
            )  # fmt: skip
            total = time.perf_counter() - start
        results.append(
            {"site": site, "layer": layer, "route": result.report["layers"][0]["route"], "compile_seconds": total,
             "refine": result.report["refine"]}
        )  # fmt: skip
        print(_row(results[-1]), flush=True)
        if args.json:  # after every site: a long run resumes where it stopped
            args.json.with_suffix(".tmp").write_text(json.dumps(results, indent=2) + "\n")
            args.json.with_suffix(".tmp").replace(args.json)
    by_key = {(r["site"], r["layer"]): r for r in results}
    rows = [by_key[k] for k in keys if k in by_key]
    print("\n" + TABLE_HEADER)
    print("\n".join(_row(r) for r in rows))
    print("\n" + "\n".join(_summary(rows)))

    if args.train:
        site, layer = keys[0]
        at_site = SteeringVector({layer: vector.directions[layer]}, site, dict(vector.metadata))
        refine = by_key[keys[0]]["refine"]
        standard = RefineOptions(steps=args.steps, lr=args.train_lr, patience=args.steps)
        trained = train_lora(loaded, at_site, samples, coef=args.coef, init="standard", options=standard)
        by_key[keys[0]]["standard_init"] = trained.to_dict()
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
    for r in rows[:4]:  # a few sites' histories; the JSON has them all
        h = r["refine"]["history"]
        print(f"{r['site']} {r['layer']} refine history:", [(x["step"], round(x["seconds"]), round(x["kl_ratio"], 4))
                                                          for x in h])  # fmt: skip

    if args.json and args.train:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
