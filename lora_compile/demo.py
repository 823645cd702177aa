"""The demo: the whole pipeline on the embedded model, in a few minutes on a laptop CPU."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import api
from .corpus import demo_pairs_path
from .display import print_compile, print_scan, print_verify
from .models import load_model
from .outputs import atomic_dir
from .vectors import SteeringVector, save_vector


def run_demo(output: Path, coef: float, force: bool, console: Console) -> None:
    """Extract a happy-vs-sad vector, scan, compile at the best site, verify, and show generations."""
    with atomic_dir(output, force) as tmp:
        console.rule("1. load the embedded model")
        loaded = load_model()
        console.print(f"{loaded.model_id}: {loaded.num_layers} layers, hidden size {loaded.hidden_size}")

        console.rule("2. extract a steering vector from the shipped contrast pairs")
        vector = api.extract_vector(demo_pairs_path(), list(range(loaded.num_layers)), loaded)
        save_vector(vector, tmp / "vector.safetensors")
        console.print(f"difference of means over {vector.metadata['pairs']} happy/sad pairs, every layer")

        console.rule("3. scan: where are constant directions?")
        result, calibration = api.scan(loaded, out_json=tmp / "scan.json", out_png=tmp / "scan.png")
        print_scan(result)
        best = result["recommended"][0]
        site, layer = best["site"], best["layer"]

        console.rule(f"4. compile at the recommended site: {site} {layer}, coef {coef}")
        at_site = SteeringVector({layer: vector.directions[layer]}, site, dict(vector.metadata))
        compiled = api.compile_adapter(at_site, tmp / "adapter", loaded, coef=coef, calibration=calibration)
        print_compile(compiled.report)

        console.rule("5. verify: PEFT-loaded adapter vs true activation addition")
        report = api.verify_adapter(tmp / "adapter", at_site, loaded, generations=3, max_new_tokens=40)
        (tmp / "verify.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
        print_verify(report)

        table = Table(title="greedy generations on held-out chat prompts", show_lines=True)
        for col in ("prompt", "true addition", "compiled adapter", "unsteered"):
            table.add_column(col, ratio=1)
        for g in report.generations:
            table.add_row(g["prompt"], g["true"], g["compiled"], g["unsteered"])
        console.print(table)
