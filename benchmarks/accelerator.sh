#!/usr/bin/env bash
# One pass over what needs an accelerator, most wanted first: #19's decode and #20's training
# step at Qwen2.5 shapes (each with its profile's split), the Pallas kernels, int8 weights,
# then the accelerator-only tests and the remaining variants. Run from the repository root on
# a GPU (or TPU) host:
#   bash benchmarks/accelerator.sh [results_dir]
# Each step's log and JSON go to results_dir (default benchmarks/results); a failing step
# does not stop the later ones, and the exit status counts the failures.
# On a machine lent for minutes: with DEADLINE_S set, no step starts after DEADLINE_S seconds
# and a running one is stopped at DEADLINE_S + GRACE_S (default 60), so a pass takes at most
# DEADLINE_S + GRACE_S + 20 s (DEADLINE_S=240: 320 s, a pass and its rerun inside a 15-minute
# lease with the machine's start); BUNDLE=1 packs this run's logs and JSON into
# results_dir/accelerator.tgz (a lease returns only a few files).
set -uo pipefail
OUT_DIR=${1:-benchmarks/results}
DEADLINE_S=${DEADLINE_S:-0}
GRACE_S=${GRACE_S:-60}
[ "$DEADLINE_S" -gt 0 ] || DEADLINE_S=$((10 ** 9))  # none
mkdir -p "$OUT_DIR"
stamp=$(mktemp)  # what this run writes is newer
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failures=0
skipped=()
step() {  # step NAME COMMAND...: run under the deadline, tee the log, count a failure
  local name=$1; shift
  if [ "$SECONDS" -ge "$DEADLINE_S" ]; then
    skipped+=("$name")
    return
  fi
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 $((DEADLINE_S + GRACE_S - SECONDS)) "$@" 2>&1 \
    | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}
finish() {
  echo "failures: $failures; skipped at the deadline: ${skipped[*]:-none}"
  if [ "${BUNDLE:-0}" = 1 ]; then
    (cd "$OUT_DIR" && find . -maxdepth 1 -newer "$stamp" \( -name '*.log' -o -name '*.json' \) \
      -print0 | tar czf accelerator.tgz --null -T -)
  fi
  rm -f "$stamp"
}
trap finish EXIT

$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
backend=$($PY -c 'import jax; print(jax.default_backend())')
kernel=pallas
[ "$backend" = tpu ] && kernel=splash
# #19: bf16 decode at batch 8-128 against the HBM roofline, with the step's profile. The
# transformers baseline is the CPU goal's; here it would only cost time.
step decode_0.5b $PY benchmarks/decode.py --config configs/bench/qwen2.5-0.5b.yaml \
  --batches 8 32 64 128 --repeats 2 --no-hf --turns 0 --long-context 0 \
  --results "$OUT_DIR/decode_qwen2.5-0.5b.json"
# #20: the 1.5B training step at 4 x 4096 tokens: MFU, peak memory, profile.
step train_step_1.5b_b4 $PY benchmarks/train_step.py --config configs/bench/qwen2.5-1.5b.yaml \
  --batch 4 --seq-len 4096 --steps 6 --results "$OUT_DIR/train_step_qwen2.5-1.5b_b4_s4096.json"
# #19: the Pallas paged-attention kernel, and an 8k-token context among short ones.
step decode_0.5b_pallas $PY benchmarks/decode.py --config configs/bench/qwen2.5-0.5b.yaml \
  --batches 64 --repeats 2 --no-hf --turns 0 --paged-attention pallas --long-context 8192 \
  --no-profile --results "$OUT_DIR/decode_qwen2.5-0.5b_pallas.json"
# #20: 32 packed episodes of 128-1024 tokens a row against one dense causal row (GPUs: the
# Pallas flash kernel with segment ids; TPUs: splash).
step train_step_1.5b_packed_$kernel $PY benchmarks/train_step.py \
  --config configs/bench/qwen2.5-1.5b.yaml --batch 1 --episodes 32 --steps 6 --no-profile \
  --results "$OUT_DIR/train_step_qwen2.5-1.5b_packed32_$kernel.json" model.attention=$kernel
# #19: the 1.5B shape, and weight-only int8 (serve.quantization=int8).
step decode_1.5b $PY benchmarks/decode.py --config configs/bench/qwen2.5-1.5b.yaml \
  --batches 8 64 --repeats 2 --no-hf --turns 0 --long-context 0 \
  --results "$OUT_DIR/decode_qwen2.5-1.5b.json"
step decode_0.5b_int8 $PY benchmarks/decode.py --config configs/bench/qwen2.5-0.5b.yaml \
  --batches 8 64 --repeats 2 --no-hf --turns 0 --long-context 0 \
  --results "$OUT_DIR/decode_qwen2.5-0.5b_int8.json" serve.quantization=int8
step accelerator_tests env JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" \
  $PY -m pytest tests/test_accelerator.py -q -p no:cacheprovider
# Remat that keeps the flash kernel's residuals against full remat; the batch-1 step; the
# packed rows through XLA's or cuDNN's dense mask.
for remat in attention full; do
  step train_step_1.5b_b4_${kernel}_remat-$remat $PY benchmarks/train_step.py \
    --config configs/bench/qwen2.5-1.5b.yaml --batch 4 --seq-len 4096 --steps 6 --no-profile \
    --results "$OUT_DIR/train_step_qwen2.5-1.5b_b4_s4096_${kernel}_remat-$remat.json" \
    model.attention=$kernel model.remat=$remat
done
step train_step_1.5b_b1 $PY benchmarks/train_step.py --config configs/bench/qwen2.5-1.5b.yaml \
  --batch 1 --seq-len 4096 --steps 6 --no-profile \
  --results "$OUT_DIR/train_step_qwen2.5-1.5b_b1_s4096.json"
dense=cudnn
[ "$backend" = tpu ] && dense=xla
step train_step_1.5b_packed_$dense $PY benchmarks/train_step.py \
  --config configs/bench/qwen2.5-1.5b.yaml --batch 1 --episodes 32 --steps 6 --no-profile \
  --results "$OUT_DIR/train_step_qwen2.5-1.5b_packed32_$dense.json" model.attention=$dense
exit "$failures"
