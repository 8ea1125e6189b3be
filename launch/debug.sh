#!/usr/bin/env bash
# Single-host debug run on the shipped default config (configs/debug.yaml), CPU or one device.
# Until the RL loop lands it exercises what exists end to end: a random tiny policy is written as
# an HF checkpoint, converted to an orbax policy checkpoint and back, decoded through the KV
# cache, and trained for a few steps by the training-step benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out="${OUT_DIR:-runs/debug}"
mkdir -p "$out"
asearcher init-model --config configs/debug.yaml --out "$out/init-hf" --overwrite "$@"
asearcher convert "$out/init-hf" "$out/policy-orbax" --overwrite
asearcher convert "$out/policy-orbax" "$out/policy-hf" --overwrite
asearcher generate "$out/policy-hf" --chat --prompt "Who wrote the novel?" --max-new-tokens 16
python benchmarks/train_step.py --config configs/debug.yaml --steps 5 --batch 4 --seq-len 256 \
  --results "$out/train_step.json" "$@"
echo "[debug] artifacts in $out"
