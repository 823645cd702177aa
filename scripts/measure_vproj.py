"""The value route into resid_mid (``compile --route``) against the writer route (``o_proj`` alone), per layer.

For the happy/sad vector at each layer (coefficient 4, shipped calibration and held-out text):
compile with ``route="writer"`` and with ``route="both"`` (a rank-1 LoRA on ``v_proj`` for the
part of the vector attention can carry, ``o_proj``'s LoRA for the rest, fitted on its input as
shifted by the first); print both routes' held-out errors of the added vector (from compile's
report), the share of ‖v‖² the value route reaches, what ``route="auto"`` keeps, and with
``--verify`` both adapters' KL ratios as ``verify`` measures them (PEFT-loaded, against true
addition, on the held-out set).

    python scripts/measure_vproj.py [--layers 2,6,10,14,18,22,26,29] [--coef 4] [--verify] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lora_compile import api
from lora_compile.corpus import demo_pairs_path
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector

SITE = "resid_mid"


def measure_layer(loaded, vector: SteeringVector, coef: float, verify: bool, workdir: Path) -> dict:
    layer = vector.layers[0]
    row: dict = {"layer": layer}
    adapters = {}
    for route in ("writer", "both"):
        start = time.perf_counter()
        adapters[route] = workdir / f"{route}{layer}"
        report = api.compile_adapter(vector, adapters[route], loaded, coef=coef, target="peft", route=route).report
        row[f"compile_seconds_{route}"] = time.perf_counter() - start
        if route == "both":
            value = report["layers"][0]["value_route"]
            row["error_writer"] = report["layers"][0]["fit_error"]["all"]["rms"]
            row["error_both"] = value["heldout_error"]["all"]
            row["reached"] = value["reached"]
            row["auto_keeps"] = "both" if row["error_both"] < row["error_writer"] else "writer"
    if verify:
        for route, path in adapters.items():
            row[f"kl_ratio_{route}"] = api.verify_adapter(path, vector, loaded, coef=coef, generations=0).kl_ratio
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,6,10,14,18,22,26,29")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--verify", action="store_true", help="also measure both adapters' KL ratios with PEFT")
    parser.add_argument("--json", default=None, help="write the rows here as well")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model()
    vector = api.extract_vector(demo_pairs_path(), layers, loaded)
    header = "| layer | error, o_proj alone | error, both routes | value route reaches (of ‖v‖²) | auto keeps |"
    rule = "|---|---|---|---|---|"
    if args.verify:
        header += " KL ratio, o_proj alone | KL ratio, both routes |"
        rule += "---|---|"
    print(header + " compile time, o_proj / both |")
    print(rule + "---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            at_layer = SteeringVector({layer: vector.directions[layer]}, SITE, vector.metadata)
            r = measure_layer(loaded, at_layer, args.coef, args.verify, Path(tmp))
            rows.append(r)
            kls = f" {r['kl_ratio_writer']:.2g} | {r['kl_ratio_both']:.2g} |" if args.verify else ""
            print(
                f"| {layer} | {r['error_writer']:.4f} | {r['error_both']:.4f} | {r['reached']:.0%} "
                f"| {r['auto_keeps']} |{kls} {r['compile_seconds_writer']:.0f} s / {r['compile_seconds_both']:.0f} s |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
