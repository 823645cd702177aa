"""Compile the demo vector at chosen sites and verify each on the full held-out set.

Reproduces the README's table:  python scripts/measure_sites.py [--self-generate N]
Prints, per site: predicted fit error, measured added-vector error, KL ratio
overall and on chat prompts, top-1 agreement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lora_compile import api, corpus
from lora_compile.calibrate import calibrate
from lora_compile.extract import extract, read_pairs
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", default="resid_mid:18,resid_mid:10,resid_post:10")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--self-generate", type=int, default=0)
    args = parser.parse_args()
    keys = [(s, int(layer)) for s, layer in (x.split(":") for x in args.sites.split(","))]
    loaded = load_model()
    vector = extract(loaded, read_pairs(corpus.demo_pairs_path()), sorted({layer for _, layer in keys}))
    start = time.time()
    samples = api.calibration_samples(loaded, None, args.self_generate)
    calibration = calibrate(loaded, samples, keys)
    print(
        f"calibration: {calibration.tokens} tokens ({time.time() - start:.0f} s), self-generated {args.self_generate}"
    )
    print("site          predicted  measured  KL ratio  KL ratio chat  top-1")
    with tempfile.TemporaryDirectory() as tmp:
        for site, layer in keys:
            vec = SteeringVector({layer: vector.directions[layer]}, site)
            out = Path(tmp) / f"{site}-{layer}"
            result = api.compile_adapter(vec, out, loaded, coef=args.coef, calibration=calibration)
            report = api.verify_adapter(out, vec, loaded, generations=0)
            print(
                f"{site} {layer:<3}  {result.report['predicted_delta_rel_error']:9.4f}  {report.delta_rel_error:8.4f}"
                f"  {report.kl_ratio:8.2e}  {report.per_domain['chat']['kl_ratio']:13.2e}  {report.top1_agreement:6.1%}"
            )


if __name__ == "__main__":
    main()
