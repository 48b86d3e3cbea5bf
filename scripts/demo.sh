#!/usr/bin/env bash
# Set up a virtual environment (if missing) and run the toy-world demo: text-only training,
# captioning of held-out images, evaluation, and an HTML report in demo_out/ (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e '.[all]'
.venv/bin/capdec demo --out "${1:-demo_out}"
