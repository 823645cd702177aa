"""Verify compiled adapters as float32, bfloat16 and float16 servers run them.

Reproduces the README's served-dtype table:  python scripts/measure_dtypes.py [--all-prompts]
Compiles the demo vector (coefficient 4) at resid_mid 18 (calibrated at that site only) and
at resid_pre 0 (exact), then verifies each in every dtype on held-out prompts (by default
3 of each domain; --all-prompts for the whole held-out set).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lora_compile import api, corpus
from lora_compile.calibrate import calibrate
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector, extract, read_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--all-prompts", action="store_true")
    args = parser.parse_args()
    loaded = load_model()
    prompts = corpus.default_heldout()
    if not args.all_prompts:
        prompts = [s for d in sorted({s.domain for s in prompts}) for s in [p for p in prompts if p.domain == d][:3]]
    vector = extract(loaded, read_pairs(corpus.demo_pairs_path()), [0, 18])
    calibration = calibrate(loaded, corpus.default_calibration(), [("resid_mid", 18)])
    print(f"{len(prompts)} prompts; site, dtype, KL ratio, floor KL, KL vs float32, excess, top-1, delta error")
    with tempfile.TemporaryDirectory() as tmp:
        for site, layer, source in (("resid_mid", 18, 18), ("resid_pre", 0, 0)):
            vec = SteeringVector({layer: vector.directions[source]}, site)
            out = Path(tmp) / f"{site}-{layer}"
            api.compile_adapter(vec, out, loaded, coef=args.coef, calibration=calibration, target="peft")
            for dtype in ("float32", "bfloat16", "float16"):
                r = api.verify_adapter(out, vec, loaded, prompts=prompts, generations=0, dtype=dtype)
                floor = "-" if r.kl_dtype_floor is None else f"{r.kl_dtype_floor:.4g} {r.kl_compiled_vs_float32:.4g}"
                excess = r.kl_ratio if r.kl_excess_ratio is None else r.kl_excess_ratio
                print(
                    f"{site} {layer}  {dtype:9s} {r.kl_ratio:.3g}  {floor}  {excess:.3g}  "
                    f"{r.top1_agreement:.1%}  {r.delta_rel_error:.3g}  ({r.tokens} tokens)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
