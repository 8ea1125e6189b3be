#!/usr/bin/env bash
# Single-host debug run on the shipped default config (configs/debug.yaml), CPU or one device:
# the asynchronous RL loop of `asearcher train` on the default world -- retrieval server,
# decode server, replay queue, learner and rollout worker as processes -- for a few steps.
# The policy is the untrained tiny model, which never earns a reward yet (an SFT warm start
# comes next), so groups with all-equal rewards are kept to let every part of the loop run.
# Extra arguments are config overrides (e.g. rl.total_steps=10); RESUME=1 continues a run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out="${OUT_DIR:-runs/debug}"
resume=()
if [ "${RESUME:-0}" = 1 ]; then
  resume=(--resume)
else
  rm -rf "$out"
fi
asearcher train --config configs/debug.yaml run.output_dir="$out" rl.total_steps=4 agent.max_turns=4 \
  agent.max_new_tokens=32 rl.filter_equal_rewards=false "${resume[@]}" "$@"
echo "[debug] metrics $out/metrics.jsonl, TensorBoard $out/tensorboard, logs $out/logs"
