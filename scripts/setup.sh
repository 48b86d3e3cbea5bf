#!/usr/bin/env bash
# Create .venv (if missing) and install capdec with the given extras (default: all).
# torch is pinned: unpinned installs pull multi-GB CUDA builds; 2.14.1 + torchvision 0.29.1 work on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e ".[${1:-all}]"
