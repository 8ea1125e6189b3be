#!/usr/bin/env bash
# Creates ./.venv once and (re)installs the package when its requirements change.
#   bash launch/setup.sh          runtime only
#   bash launch/setup.sh test     plus the test extras (pytest, CPU torch, transformers)
# ASEARCHER_VENV names another environment to use instead of ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
venv="${ASEARCHER_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
want=$(cat pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1)
if [ -z "$extras" ] && [ "$(cat "$venv/.installed-test" 2>/dev/null || true)" = "$want" ]; then
  exit 0  # the test install holds the runtime one
fi
stamp="$venv/.installed${extras:+-$extras}"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing asearcher-jax${extras:+[$extras]} into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r requirements.txt -e ".${extras:+[$extras]}"
  if [ "$extras" = test ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      google-jetstream==0.2.2
  fi
  echo "$want" > "$stamp"
fi
