#!/usr/bin/env bash
# Cloud TPU pods, disaggregated: a learner slice (one jax.distributed process per host, the mesh
# over every chip) and a decode slice (a decode server, a retrieval server and rollout workers
# on each host). Both slices must mount one shared filesystem at $SHARED (e.g. Filestore) for
# the run folder and the published weights.
#   launch/tpu_pod.sh create   # both slices
#   launch/tpu_pod.sh copy     # this repository to every host of both, then its environment
#   launch/tpu_pod.sh start    # every process on every host (plan first; token generated once)
#   launch/tpu_pod.sh status   # the last lines of every host's logs
#   launch/tpu_pod.sh stop     # the processes `start` started, by their ids: the learner first
#   launch/tpu_pod.sh delete   # both slices
# Settings (environment): NAME (asearcher), ZONE (us-east5-a), PROJECT (gcloud's default),
# CONFIG (configs/qwen2.5-14b-v5p.yaml), LEARNER_TYPE (v5p-64), DECODE_TYPE (v5p-32),
# RUNTIME (v2-alpha-tpuv5), SHARED (/mnt/shared), ROLLOUTS_PER_HOST (2), EXTRA (overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:?usage: launch/tpu_pod.sh create|copy|start|status|stop|delete}"
NAME="${NAME:-asearcher}"
ZONE="${ZONE:-us-east5-a}"
CONFIG="${CONFIG:-configs/qwen2.5-14b-v5p.yaml}"
LEARNER_TYPE="${LEARNER_TYPE:-v5p-64}"
DECODE_TYPE="${DECODE_TYPE:-v5p-32}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
SHARED="${SHARED:-/mnt/shared}"
ROLLOUTS_PER_HOST="${ROLLOUTS_PER_HOST:-2}"
EXTRA="${EXTRA:-}"
REPLAY_PORT=50100
DECODE_PORT=50051
SEARCH_PORT=8010
REMOTE_DIR='~/asearcher_jax'
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
if [ -n "${PROJECT:-}" ]; then
  where+=(--project "$PROJECT")
fi
slices=("$NAME-learner" "$NAME-decode")

on_all() {  # on_all SLICE COMMAND: the command on every host of the slice, in parallel
  "${gc[@]}" ssh "$1" "${where[@]}" --worker=all --command "$2"
}

ips() {  # internal IPs of a slice's hosts, in worker order, space separated
  "${gc[@]}" describe "$1" "${where[@]}" --format='value(networkEndpoints[].ipAddress)' \
    | tr ';,' '  '
}

token() {  # one token per pod, kept outside the repository (so `copy` never ships it)
  local f="${XDG_CONFIG_HOME:-$HOME/.config}/asearcher/tpu_pod_$NAME.token"
  if [ ! -s "$f" ]; then
    (umask 077 && mkdir -p "$(dirname "$f")" && openssl rand -hex 24 >"$f")
  fi
  cat "$f"
}

# A remote process: started under nohup, its name and id appended to /tmp/asearcher.pids for
# `stop`; and a wait until a server's port accepts connections.
launch_fn='launch() { local name="$1"; shift; nohup "$@" >"/tmp/asearcher-$name.log" 2>&1 &
  echo "$name $!" >>/tmp/asearcher.pids; };
  wait_port() { until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do sleep 5; done; }'
# `stop SECONDS PATTERN...` on a host: SIGTERM to the processes `launch` started under a name
# matching a pattern, then SIGKILL to those still running after SECONDS. A bare id (the pids
# file of an older `start`) goes with the first call.
stop_fn='stop() { local wait_s="$1" n p pat t; shift; local pids=();
  while read -r n p; do [[ -z $p && $n =~ ^[0-9]+$ ]] && { pids+=("$n"); continue; };
  for pat in "$@"; do if [[ -n $p && $n == $pat ]]; then pids+=("$p");
  fi; done; done < <(cat /tmp/asearcher.pids 2>/dev/null);
  [ ${#pids[@]} -gt 0 ] || return 0; kill -TERM "${pids[@]}" 2>/dev/null;
  for ((t = 0; t < wait_s; t++)); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 1;
  done; echo "$(hostname): still running after ${wait_s}s, killed: ${pids[*]}";
  kill -KILL "${pids[@]}" 2>/dev/null; return 0; }'

case "$cmd" in
  create)
    "${gc[@]}" create "$NAME-learner" "${where[@]}" --accelerator-type "$LEARNER_TYPE" \
      --version "$RUNTIME"
    "${gc[@]}" create "$NAME-decode" "${where[@]}" --accelerator-type "$DECODE_TYPE" \
      --version "$RUNTIME"
    ;;
  copy)
    archive="$(mktemp -t asearcher.XXXXXX.tar.gz)"
    tar --exclude=.venv --exclude=runs --exclude=.git --exclude='*.pyc' -czf "$archive" .
    for s in "${slices[@]}"; do
      "${gc[@]}" scp "$archive" "$s:/tmp/asearcher.tar.gz" "${where[@]}" --worker=all
      on_all "$s" "mkdir -p $REMOTE_DIR && tar -xzf /tmp/asearcher.tar.gz -C $REMOTE_DIR && \
        cd $REMOTE_DIR && bash launch/setup.sh && .venv/bin/python -m pip install --quiet \
        --upgrade 'jax[tpu]'"
    done
    rm -f "$archive"
    ;;
  start)
    learner_ips=($(ips "$NAME-learner"))
    decode_ips=($(ips "$NAME-decode"))
    replay="${learner_ips[0]}:$REPLAY_PORT"
    addresses=""
    for ip in "${decode_ips[@]}"; do
      addresses+="${addresses:+,}$ip:$DECODE_PORT"
    done
    workers=$((${#decode_ips[@]} * ROLLOUTS_PER_HOST))
    common="--config $CONFIG placement.replay_address=$replay \
      placement.decode_addresses=[$addresses] $EXTRA"
    "${PYTHON:-.venv/bin/python}" -m asearcher_jax.cli plan $common  # refuses what won't fit
    tok="$(token)"
    env="export ASEARCHER_TOKEN=$tok PYTHONUNBUFFERED=1; cd $REMOTE_DIR; $launch_fn; \
      id=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)"
    on_all "$NAME-decode" "$env; \
      launch retrieval env JAX_PLATFORMS=cpu .venv/bin/asearcher retrieval serve $common \
        --port $SEARCH_PORT; \
      launch decode .venv/bin/asearcher serve $common serve.host=0.0.0.0 \
        serve.grpc_port=$DECODE_PORT serve.http_port=null; \
      wait_port 127.0.0.1 $DECODE_PORT; wait_port 127.0.0.1 $SEARCH_PORT; \
      for j in \$(seq 0 $((ROLLOUTS_PER_HOST - 1))); do \
        launch rollout\$j env JAX_PLATFORMS=cpu .venv/bin/asearcher rollout $common \
          search.url=http://127.0.0.1:$SEARCH_PORT --decode 127.0.0.1:$DECODE_PORT \
          --worker \$((id * $ROLLOUTS_PER_HOST + j)) --workers $workers; done"
    on_all "$NAME-learner" "$env; \
      if [ \"\$id\" = 0 ]; then launch replay env JAX_PLATFORMS=cpu .venv/bin/python -m \
        asearcher_jax.replay.server --host 0.0.0.0 --port $REPLAY_PORT \
        --journal $SHARED/replay/$NAME; fi; \
      wait_port ${learner_ips[0]} $REPLAY_PORT; \
      launch learner .venv/bin/asearcher learn $common distributed.mode=on"
    echo "[tpu_pod] started: replay $replay, decode $addresses, $workers rollout workers"
    ;;
  status)
    for s in "${slices[@]}"; do
      on_all "$s" 'for f in /tmp/asearcher-*.log; do echo "== $(hostname) $f"; tail -n 3 "$f"; done'
    done
    ;;
  stop)
    # asearcher train's order: every learner process first (it finishes its step and takes its
    # last checkpoint, which needs the decode servers and the queue), then the rollout workers,
    # then the servers, the replay queue last.
    on_all "$NAME-learner" "$stop_fn; stop 300 learner"
    on_all "$NAME-decode" "$stop_fn; stop 30 'rollout*'; stop 30 decode retrieval; \
      rm -f /tmp/asearcher.pids"
    on_all "$NAME-learner" "$stop_fn; stop 30 replay; rm -f /tmp/asearcher.pids"
    ;;
  delete)
    for s in "${slices[@]}"; do
      "${gc[@]}" delete "$s" "${where[@]}" --quiet
    done
    ;;
  *)
    echo "unknown command $cmd: create|copy|start|status|stop|delete" >&2
    exit 2
    ;;
esac
