#!/usr/bin/env bash
# Set up the virtual environment (scripts/setup.sh) and run the toy-world demo: text-only training,
# captioning of held-out images, evaluation, and an HTML report in demo_out/ (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
.venv/bin/capdec demo --out "${1:-demo_out}"
