#!/usr/bin/env bash
# Set up a virtual environment (if missing) and run the default test suite.
# torch is pinned: unpinned installs pull multi-GB CUDA builds; 2.14.1 + torchvision 0.29.1 work on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q --disable-pip-version-check -e '.[all,test]'
# two workers, one thread each: oversubscribed cores make small models many times slower
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 "$@"
