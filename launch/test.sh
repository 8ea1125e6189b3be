#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
exec "${ASEARCHER_VENV:-.venv}/bin/python" -m pytest tests "$@"
