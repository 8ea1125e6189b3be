#!/usr/bin/env bash
# One pass over what needs an accelerator: the accelerator-only tests, then the training-step
# and decode benchmarks. Run from the repository root on a GPU (or TPU) host:
#   bash benchmarks/accelerator.sh [results_dir]
# Each step's log and JSON go to results_dir (default benchmarks/results); a failing step
# does not stop the later ones, and the exit status counts the failures.
set -uo pipefail
OUT_DIR=${1:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failures=0
step() {  # step NAME COMMAND...: run, tee the log, count a failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step accelerator_tests env JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" \
  $PY -m pytest tests/test_accelerator.py -q -p no:cacheprovider
step train_step_1.5b_b1 $PY benchmarks/train_step.py --config configs/bench/qwen2.5-1.5b.yaml \
  --batch 1 --seq-len 4096 --steps 8 --results "$OUT_DIR/train_step_qwen2.5-1.5b_b1_s4096.json"
# The transformers baseline shares the GPU: keep JAX from preallocating most of it.
step decode_0.5b env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $PY benchmarks/decode.py \
  --config configs/bench/qwen2.5-0.5b.yaml --batches 1 8 32 64 --repeats 2 \
  --results "$OUT_DIR/decode_qwen2.5-0.5b.json"
# The same with the Pallas paged-attention kernel, and an 8k-token context among short ones.
step decode_0.5b_pallas env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $PY benchmarks/decode.py \
  --config configs/bench/qwen2.5-0.5b.yaml --batches 64 --repeats 2 --no-hf \
  --paged-attention pallas --long-context 8192 \
  --results "$OUT_DIR/decode_qwen2.5-0.5b_pallas.json"
# Weight-only int8 serving (serve.quantization=int8): half the weight bytes of bf16 a step.
step decode_0.5b_int8 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $PY benchmarks/decode.py \
  --config configs/bench/qwen2.5-0.5b.yaml --batches 8 64 --repeats 2 --no-hf --turns 0 \
  --long-context 0 --results "$OUT_DIR/decode_qwen2.5-0.5b_int8.json" serve.quantization=int8
step train_step_1.5b_b4 $PY benchmarks/train_step.py --config configs/bench/qwen2.5-1.5b.yaml \
  --batch 4 --seq-len 4096 --steps 8 --results "$OUT_DIR/train_step_qwen2.5-1.5b_b4_s4096.json"
# Packed rows (32 episodes of 128-1024 tokens a row) against one dense causal row: on GPUs
# cuDNN's dense mask against the Pallas flash kernel with segment ids (model.attention=pallas),
# on TPUs XLA against splash attention.
impls="cudnn pallas"
[ "$($PY -c 'import jax; print(jax.default_backend())')" = tpu ] && impls="xla splash"
for impl in $impls; do
  step train_step_1.5b_packed_$impl $PY benchmarks/train_step.py \
    --config configs/bench/qwen2.5-1.5b.yaml --batch 1 --episodes 32 --steps 8 \
    --results "$OUT_DIR/train_step_qwen2.5-1.5b_packed32_$impl.json" model.attention=$impl
done
# Remat that keeps the flash kernel's residuals against full remat (GPU: pallas; TPU: splash).
kernel=pallas
[ "$($PY -c 'import jax; print(jax.default_backend())')" = tpu ] && kernel=splash
for remat in attention full; do
  step train_step_1.5b_b4_${kernel}_remat-$remat $PY benchmarks/train_step.py \
    --config configs/bench/qwen2.5-1.5b.yaml --batch 4 --seq-len 4096 --steps 8 \
    --results "$OUT_DIR/train_step_qwen2.5-1.5b_b4_s4096_${kernel}_remat-$remat.json" \
    model.attention=$kernel model.remat=$remat
done
echo "failures: $failures"
exit "$failures"
