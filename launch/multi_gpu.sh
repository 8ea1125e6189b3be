#!/usr/bin/env bash
# Every process of an RL run on one multi-GPU host, placed by the config's `placement:` section:
# the replay queue, one decode server per share of placement.decode_devices (each on its own
# GPUs, address from placement.decode_addresses), the learner on placement.learner_devices, the
# retrieval server, and rl.rollout_workers rollout workers (CPU). The config is checked with
# `asearcher plan` first, so a run that would not fit never starts.
#   bash launch/multi_gpu.sh configs/qwen2.5-7b-8xh100.yaml [--resume] [key=value ...]
# Logs: <run.output_dir>/logs/*.log. Ctrl-C, or any process exiting, stops them all; rerun
# with --resume to continue from the learner's last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: bash launch/multi_gpu.sh CONFIG [--resume] [key=value ...]}"
shift
resume=()
if [ "${1:-}" = "--resume" ]; then
  resume=(--resume)
  shift
fi
overrides=("$@")
if [ -z "${PYTHON:-}" ]; then
  bash launch/setup.sh
  PYTHON="${ASEARCHER_VENV:-.venv}/bin/python"
fi
cli=("$PYTHON" -m asearcher_jax.cli)

"${cli[@]}" plan --config "$config" "${overrides[@]}"

# What the config says about this host's processes, as shell variables (exits if it cannot).
vars="$("$PYTHON" - "$config" "${overrides[@]}" <<'EOF'
import shlex
import sys

from asearcher_jax.config import load_config

c = load_config(sys.argv[1], sys.argv[2:])
p = c.placement
if not p.replay_address or not p.decode_addresses:
  sys.exit("launch/multi_gpu.sh needs placement.replay_address and placement.decode_addresses")
# One decode server starts per address; the memory split and the devices assume as many.
servers = c.rl.decode_servers
if p.mode == "disaggregated" and p.decode_devices:
  servers = len(p.decode_devices) // (p.decode_num_devices or len(p.decode_devices))
if len(p.decode_addresses) != servers:
  sys.exit(f"launch/multi_gpu.sh: {len(p.decode_addresses)} placement.decode_addresses, but "
           f"{servers} decode servers (" + ("rl.decode_servers, which splits the GPUs' memory"
           if servers == c.rl.decode_servers else "shares of placement.decode_devices") + ")")
print(f"out={shlex.quote(c.run.output_dir)}")
print(f"replay={shlex.quote(p.replay_address)}")
print("decode=(" + " ".join(shlex.quote(a) for a in p.decode_addresses) + ")")
print(f"workers={c.rl.rollout_workers}")
print(f"search_local={int(c.search.backend == 'local')}")
print(f"search_url={shlex.quote(c.search.url)}")
EOF
)"
eval "$vars"
logs="$out/logs"
mkdir -p "$logs" "$out/replay"
pids=()

start() {  # start NAME ENV... -- CMD...: one background process, its log in $logs/NAME.log
  local name="$1"
  shift
  local env=()
  while [ "$1" != "--" ]; do
    env+=("$1")
    shift
  done
  shift
  echo "[multi_gpu] $name: $*" | tee -a "$logs/$name.log"
  env "${env[@]}" PYTHONUNBUFFERED=1 "$@" >>"$logs/$name.log" 2>&1 &
  pids+=("$!")
}

stop_all() {
  trap - EXIT INT TERM
  echo "[multi_gpu] stopping"
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait || true
}
trap stop_all EXIT INT TERM

wait_decode() {  # blocks until the decode server at $1 answers Stats
  "$PYTHON" - "$1" <<'EOF'
import asyncio
import os
import sys
import time

from asearcher_jax.inference.client import DecodeClient


async def ready(address):
  async with DecodeClient(address, token=os.environ.get("ASEARCHER_TOKEN"), timeout=2) as c:
    await c.stats()


deadline = time.monotonic() + 1800
while True:
  try:
    asyncio.run(ready(sys.argv[1]))
    break
  except Exception:
    if time.monotonic() > deadline:
      sys.exit(f"decode server {sys.argv[1]} did not come up")
    time.sleep(2)
EOF
}

start replay JAX_PLATFORMS=cpu -- "$PYTHON" -m asearcher_jax.replay.server \
  --journal "$out/replay" --host "${replay%:*}" --port "${replay##*:}"
if [ "$search_local" = 1 ]; then
  port="${search_url##*:}"
  start retrieval JAX_PLATFORMS=cpu -- "${cli[@]}" retrieval serve --config "$config" \
    "${overrides[@]}" --port "${port%%/*}"
fi
for i in "${!decode[@]}"; do
  a="${decode[$i]}"
  start "decode$i" -- "${cli[@]}" serve --config "$config" "${overrides[@]}" \
    "placement.decode_replica=$i" "serve.host=${a%:*}" "serve.grpc_port=${a##*:}" \
    serve.http_port=null
done
for a in "${decode[@]}"; do
  wait_decode "$a"
done
echo "[multi_gpu] decode servers up: ${decode[*]}"
start learner -- "${cli[@]}" learn --config "$config" "${overrides[@]}" "${resume[@]}"
learner=$!
for ((w = 0; w < workers; w++)); do
  start "rollout$w" JAX_PLATFORMS=cpu -- "${cli[@]}" rollout --config "$config" \
    "${overrides[@]}" --worker "$w" --workers "$workers"
done
echo "[multi_gpu] running; logs in $logs"
status=0
wait -n || status=$?
if kill -0 "$learner" 2>/dev/null; then
  echo "[multi_gpu] a process exited (status $status) before the learner finished; see $logs"
  status=1
fi
exit "$status"
