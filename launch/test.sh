#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the test suite (extra args go to pytest).
# TEST_WORKERS (default 2) test processes share the tests a file at a time (pytest-xdist): the
# end-to-end files spend much of their time waiting on servers they started, which the other
# worker fills; 0 runs everything in this process. A worker that crashes ends the run
# (--max-worker-restart=0): pytest-xdist re-runs the crashed test on a replacement worker, and
# under --dist loadfile a replacement can wait forever for work.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
workers="${TEST_WORKERS:-2}"
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadfile --max-worker-restart=0)
exec "${ASEARCHER_VENV:-.venv}/bin/python" -m pytest "${parallel[@]}" tests "$@"
