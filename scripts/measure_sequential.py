"""Multi-layer compiles: sequential calibration against independent, on the full held-out set.

Reproduces the README's table:  python scripts/measure_sequential.py [--layers 8,10,12,14]
Prints, per site and mode: KL ratio overall and on chat prompts, top-1 agreement,
added-vector error, and the compile time.
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
    parser.add_argument("--sites", default="resid_post,resid_mid")
    parser.add_argument("--layers", default="8,10,12,14")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--per-domain", type=int, default=0, help="held-out samples per domain (0: all)")
    args = parser.parse_args()
    heldout, seen = [], {}
    for s in corpus.default_heldout():
        seen[s.domain] = seen.get(s.domain, 0) + 1
        if not args.per_domain or seen[s.domain] <= args.per_domain:
            heldout.append(s)
    sites, layers = args.sites.split(","), [int(x) for x in args.layers.split(",")]
    loaded = load_model()
    vector = extract(loaded, read_pairs(corpus.demo_pairs_path()), layers)
    calibration = calibrate(loaded, corpus.default_calibration(), [(s, layer) for s in sites for layer in layers])
    print(f"layers {layers}, coef {args.coef}")
    print("site        mode         KL ratio  KL ratio chat  top-1   added-vector error  compile s")
    with tempfile.TemporaryDirectory() as tmp:
        for site in sites:
            vec = SteeringVector(vector.directions, site)
            for sequential in (False, True):
                out = Path(tmp) / f"{site}-{sequential}"
                start = time.time()
                api.compile_adapter(
                    vec, out, loaded, coef=args.coef, calibration=calibration, sequential=sequential, heldout=heldout
                )
                seconds = time.time() - start
                report = api.verify_adapter(out, vec, loaded, prompts=heldout, generations=0)
                mode = "sequential" if sequential else "independent"
                print(
                    f"{site:<10}  {mode:<11}  {report.kl_ratio:8.2e}  {report.per_domain['chat']['kl_ratio']:13.2e}"
                    f"  {report.top1_agreement:6.1%}  {report.delta_rel_error:18.4f}  {seconds:9.0f}"
                )


if __name__ == "__main__":
    main()
