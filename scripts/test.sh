#!/usr/bin/env bash
# Set up, lint, and run the test suite (the 15 slowest tests listed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff check lora_compile tests scripts
python -m pytest -q --durations=15 -m "not engine" "$@"
