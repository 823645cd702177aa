"""How far the suite's numeric bounds are from failing, under every CPU kernel choice.

PyTorch picks its CPU kernels by the processor (``ATEN_CPU_CAPABILITY`` forces a choice:
default, avx2, avx512) and sums in another order with another thread count, so a number
measured on one machine moves on another. This runs the tests marked ``numeric`` once per
variant (capability × threads, each in a fresh process), with every bound they check
recorded (the ``bound`` fixture in ``tests/conftest.py``), and prints a Markdown table:
each bound beside the range of its value across the variants, and each variant's result.

    python scripts/measure_kernels.py                       # default, avx2, avx512 × 1, 2 threads
    python scripts/measure_kernels.py --variants avx2:2 default:1 --out bounds.md
    python scripts/measure_kernels.py --all                 # the whole suite, not only `numeric`
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

ROOT = Path(__file__).resolve().parent.parent


def run_variant(capability: str, threads: str, record: Path, everything: bool, log: Path | None) -> tuple[str, float]:
    record.unlink(missing_ok=True)  # a rerun of a variant replaces its record
    env = {**os.environ, "LORA_COMPILE_BOUNDS": str(record), "OMP_NUM_THREADS": threads}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "--durations=10",
            *([] if everything else ["-m", "numeric"]),
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if log:
        log.write_text(proc.stdout + proc.stderr)
    summary = next((line for line in reversed(proc.stdout.splitlines()) if " in " in line), "no summary")
    return summary.strip("= "), time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[f"{c}:{t}" for c in ("default", "avx2", "avx512") for t in (1, 2)],
        help="CAPABILITY:THREADS (an empty capability keeps the machine's own choice)",
    )
    parser.add_argument("--all", action="store_true", help="run the whole suite in each variant")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table of the records in --logs")
    parser.add_argument("--logs", type=Path, help="keep each variant's pytest output in this directory")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    values: dict[tuple[str, str], dict] = {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        # With --logs the records stay beside the logs, and the table counts every variant recorded there.
        records = args.logs or Path(tmp)
        for variant in [] if args.table_only else args.variants:
            capability, threads = variant.split(":")
            log = args.logs / f"{capability or 'own'}-{threads}.log" if args.logs else None
            summary, seconds = run_variant(
                capability, threads, records / f"{capability or 'own'}-{threads}.jsonl", args.all, log
            )
            runs.append(f"| {capability or 'own'} | {threads} | {summary} | {seconds:.0f} s |")
            print(runs[-1], flush=True)
        for record in sorted(records.glob("*.jsonl")):
            for line in record.read_text().splitlines():
                r = json.loads(line)
                entry = values.setdefault((r["test"], r["name"]), {"limit": r["limit"], "kind": r["kind"], "seen": []})
                entry["seen"].append(r["value"])
        recorded = [r.stem.replace("-", ":") for r in sorted(records.glob("*.jsonl"))]
    lines = [
        f"Variants recorded: {', '.join(recorded)} (ATEN_CPU_CAPABILITY:threads).",
        "",
        f"| variant | threads | {'all' if args.all else 'numeric'} tests | time |",
        "|---|---|---|---|",
        *runs,
        "",
        "| test | bound | limit | measured (min … max over variants) |",
        "|---|---|---|---|",
    ]
    for (test, name), e in sorted(values.items()):
        sign = "≤" if e["kind"] == "max" else "≥"
        test, name = test.replace("|", "\\|"), name.replace("|", "\\|")  # Markdown cells
        lines.append(f"| {test} | {name} | {sign} {e['limit']:.6g} | {min(e['seen']):.4g} … {max(e['seen']):.4g} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
