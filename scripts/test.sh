#!/usr/bin/env bash
# Set up the virtual environment (scripts/setup.sh) and run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all,test
# two workers, one thread each: oversubscribed cores make small models many times slower
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 "$@"
