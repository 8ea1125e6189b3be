#!/usr/bin/env bash
# Single-host debug run on the shipped default config (configs/debug.yaml), CPU or one device.
# Until the RL loop lands it exercises what exists end to end, on the default world:
#   1. a random tiny policy written as an HF checkpoint, converted to orbax and back;
#   2. the default world (corpus, pages, QA) and its BM25 index, queried through the
#      retrieval server with one held-out question;
#   3. the decode server on the policy, asked the same question through its OpenAI endpoint;
#   4. a few training steps of the training-step benchmark.
# Extra arguments are config overrides (e.g. model.arch.num_layers=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out="${OUT_DIR:-runs/debug}"
retrieval_port="${RETRIEVAL_PORT:-18010}"
http_port="${DECODE_HTTP_PORT:-18000}"
mkdir -p "$out"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

asearcher init-model --config configs/debug.yaml --out "$out/init-hf" --overwrite "$@"
asearcher convert "$out/init-hf" "$out/policy-orbax" --overwrite
asearcher convert "$out/policy-orbax" "$out/policy-hf" --overwrite

asearcher world build --out "$out/world" --index --overwrite
question=$(head -n 1 "$out/world/qa_test.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["question"])')
asearcher retrieval serve --index "$out/world/index" --port "$retrieval_port" > "$out/retrieval.log" 2>&1 &
pids+=($!)
asearcher serve --config configs/debug.yaml "$@" model.path="$out/policy-hf" model.arch=null \
  serve.grpc_port=0 serve.http_port="$http_port" > "$out/decode.log" 2>&1 &
pids+=($!)

wait_for() {  # url: poll until it answers, up to 120 s
  python - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(240):
  try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
    sys.exit(0)
  except OSError:
    time.sleep(0.5)
sys.exit(f"[debug] {sys.argv[1]} did not come up")
PY
}
wait_for "http://127.0.0.1:$retrieval_port/health"
wait_for "http://127.0.0.1:$http_port/health"
echo "[debug] question: $question"
python - "$question" "$retrieval_port" "$http_port" <<'PY'
import json, sys, urllib.request
question, retrieval_port, http_port = sys.argv[1], sys.argv[2], sys.argv[3]
def post(url, body):
  req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
  return json.load(urllib.request.urlopen(req, timeout=120))
hits = post(f"http://127.0.0.1:{retrieval_port}/retrieve", {"queries": [question], "topk": 3})
for h in hits["result"][0]:
  print(f"[debug] retrieved {h['id']} ({h['score']:.2f}): {h['contents'][:80]!r}")
out = post(f"http://127.0.0.1:{http_port}/v1/chat/completions", {
    "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
    "logprobs": True})
c = out["choices"][0]
print(f"[debug] untrained policy answers {c['message']['content']!r} "
      f"({len(c['logprobs']['content'])} tokens with log-probs, {out['system_fingerprint']})")
PY

python benchmarks/train_step.py --config configs/debug.yaml --steps 5 --batch 4 --seq-len 256 \
  --results "$out/train_step.json" "$@"
echo "[debug] artifacts in $out"
