#!/usr/bin/env bash
# Every process of an RL run on one multi-GPU host, placed by the config's `placement:` section:
# the replay queue, one decode server per share of placement.decode_devices (each on its own
# GPUs, address from placement.decode_addresses), the learner on placement.learner_devices, the
# retrieval server, and rl.rollout_workers rollout workers (CPU). The config is checked with
# `asearcher plan` first, so a run that would not fit never starts.
#   bash launch/multi_gpu.sh configs/qwen2.5-7b-8xh100.yaml [--resume] [key=value ...]
# Logs: <run.output_dir>/logs/*.log. Ctrl-C (or SIGTERM), or any process exiting, stops them
# all: the learner first (it finishes its step and checkpoints, which needs the servers), then
# the rollout workers, then the servers. Rerun with --resume to continue from the learner's last
# checkpoint; the rollout workers then start once the servers hold the restored weights.
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
names=()
learner=""
waiter=""  # a wait for the servers, run in the background (below)

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
  # In its own session, so that Ctrl-C reaches this script alone and it stops them in order;
  # tied to this script (asearcher_jax.procs.follow_supervisor): SIGTERM should it die.
  setsid env "${env[@]}" PYTHONUNBUFFERED=1 ASEARCHER_SUPERVISOR_PID=$$ "$@" \
    >>"$logs/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
}

running() {  # running PID...: whether any of them still runs
  local pid
  for pid; do
    if kill -0 "$pid" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

stop() {  # stop SECONDS PID...: SIGTERM, then SIGKILL those still running after SECONDS
  local wait_s="$1" t
  shift
  [ "$#" -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((t = 0; t < 5 * wait_s; t++)); do
    running "$@" || break
    sleep 0.2
  done
  if running "$@"; then
    echo "[multi_gpu] still running after ${wait_s}s, killed: $*"
    kill -KILL "$@" 2>/dev/null || true
  fi
  wait "$@" 2>/dev/null || true
}

named() {  # named PATTERN: the ids of the processes started under a name matching PATTERN
  local i
  for i in "${!names[@]}"; do
    # shellcheck disable=SC2053  # a pattern
    if [[ ${names[$i]} == $1 ]]; then
      echo "${pids[$i]}"
    fi
  done
}

stop_all() {
  trap - EXIT INT TERM HUP
  # asearcher train's order: the learner's last step and checkpoint need the decode servers
  # (it publishes) and the queue (it acknowledges); the workers feed the queue until then.
  echo "[multi_gpu] stopping: the learner (it checkpoints), then the rollout workers, the" \
    "decode servers, retrieval and the replay queue"
  stop 10 $waiter
  stop 300 $learner
  stop 30 $(named 'rollout*')
  stop 30 $(named 'decode*')
  stop 30 $(named retrieval)
  stop 30 $(named replay)
}
# A signal stops everything and then the script (bash would otherwise go on where it was).
trap stop_all EXIT
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 129' HUP

wait_decode() {  # wait_decode NAME ADDRESS: blocks until that decode server answers Stats
  "$PYTHON" - "$1" "$2" "$(named "$1")" <<'EOF' &
import asyncio
import os
import sys
import time

from asearcher_jax.inference.client import DecodeClient
from asearcher_jax.procs import pid_alive


async def ready(address):
  async with DecodeClient(address, token=os.environ.get("ASEARCHER_TOKEN"), timeout=2) as c:
    await c.stats()


name, address, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 1800
while True:
  try:
    asyncio.run(ready(address))
    break
  except Exception:
    if not pid_alive(pid):
      sys.exit(f"[multi_gpu] decode server {address} exited while starting; see {name}.log")
    if time.monotonic() > deadline:
      sys.exit(f"decode server {address} did not come up")
    time.sleep(2)
EOF
  waiter=$!  # waited for in the background: a signal's trap then runs at once
  wait "$waiter"
  waiter=""
}

restored_before() {  # on --resume: the queue's version now (nothing: nothing to wait for)
  "$PYTHON" - "$config" "${overrides[@]}" <<'EOF'
import os
import sys
import time

from asearcher_jax.config import load_config
from asearcher_jax.placement import client_token
from asearcher_jax.rl.supervisor import restored_to_wait_above

c = load_config(sys.argv[1], sys.argv[2:])
ckpt = c.checkpoint.directory or os.path.join(c.run.output_dir, "checkpoints")
deadline = time.monotonic() + 120
while True:  # the queue has just been started
  try:
    v = restored_to_wait_above(c.placement.replay_address, ckpt, client_token(c))
    break
  except Exception:
    if time.monotonic() > deadline:
      raise
    time.sleep(1)
print("" if v is None else v)
EOF
}

wait_restored() {  # wait_restored VERSION: until the queue's version rises above VERSION
  "$PYTHON" - "$1" "$learner" "$config" "${overrides[@]}" <<'EOF' &
import sys
import time

from asearcher_jax.config import load_config
from asearcher_jax.placement import client_token
from asearcher_jax.procs import pid_alive
from asearcher_jax.rl.supervisor import replay_version

before, learner = int(sys.argv[1]), int(sys.argv[2])
c = load_config(sys.argv[3], sys.argv[4:])
timeout_s = 900
deadline = time.monotonic() + timeout_s
while True:
  try:
    if replay_version(c.placement.replay_address, client_token(c)) > before:
      break
  except Exception:  # asked again
    pass
  if not pid_alive(learner):
    sys.exit("[multi_gpu] the learner exited before it served its restored weights; see "
             "learner.log")
  if time.monotonic() > deadline:
    sys.exit(f"[multi_gpu] the learner did not serve its restored weights in {timeout_s}s "
             f"(the replay queue is still at version {before}); see learner.log")
  time.sleep(0.5)
EOF
  waiter=$!
  wait "$waiter"
  waiter=""
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
for i in "${!decode[@]}"; do
  wait_decode "decode$i" "${decode[$i]}"
done
echo "[multi_gpu] decode servers up: ${decode[*]}"
before=""
if [ "${#resume[@]}" -gt 0 ]; then
  before="$(restored_before)"
fi
start learner -- "${cli[@]}" learn --config "$config" "${overrides[@]}" "${resume[@]}"
learner=$!
if [ -n "$before" ]; then
  # The servers were just started with the initial weights: rollouts begun now would be theirs.
  echo "[multi_gpu] waiting for the learner to serve its restored weights (the replay queue is" \
    "at version $before) before starting the rollout workers"
  wait_restored "$before"
  echo "[multi_gpu] the decode servers hold the restored weights"
fi
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
