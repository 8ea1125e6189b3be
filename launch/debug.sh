#!/usr/bin/env bash
# Single-host debug mode, the whole story on the shipped default config (configs/debug.yaml),
# CPU or one device, each stage a plain `asearcher` command:
#   1. the default world (corpus, linked pages, 1-4 hop questions) with one fact per passage
#      (with agent.topk 1 a search returns one sentence to read), and its BM25 index;
#   2. a BPE tokenizer trained on the world and a tiny Qwen3 policy, as an HF directory;
#   3. expert trajectories: the programmatic solver through the real agent and retrieval server;
#   4. SFT warm start on them (`asearcher sft`), then held-out evaluation (Avg@4 / Pass@4);
#   5. the asynchronous RL loop (`asearcher train`: retrieval server, decode server, replay
#      queue, learner and rollout worker as processes), then held-out evaluation against SFT.
# Environment: OUT_DIR (default runs/debug); SEED (default 0): the policy's initialisation, the
# SFT data order, and the RL stage's data order and sampling; the world, the expert data and the
# held-out questions with their sampling seeds stay the same, so seeds differ by training alone
# (benchmarks/debug_seeds.py runs several); RESUME=1 keeps finished stages and continues the RL
# run; SFT_TRAJ (train questions the expert solves for SFT, default 1200, or all; the RL stage
# learns on the others, or on all of them with all), SFT_EPOCHS
# (default 4; the loss is on the agent's own tokens: trained on the text it reads too, the
# untrained policy learns to recall the world's facts and writes them over what it reads),
# SFT_BATCH_ROWS (rows of 640 tokens a step, default 4; one row a step makes four times the
# updates in 1.3 times the time, and was no better over seeds 0-2: README),
# EVAL_QUESTIONS (held-out questions, default configs/debug.yaml's eval.limit); extra arguments
# are config overrides of the RL stage (e.g. rl.total_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$(cd "${ASEARCHER_VENV:-.venv}" && pwd)/bin:$PATH"
out="${OUT_DIR:-runs/debug}"
cfg=configs/debug.yaml
world="$out/world"
seed="${SEED:-0}"
if [ "${RESUME:-0}" != 1 ]; then
  rm -rf "$out"
fi
mkdir -p "$out"
clock() { echo "$(( SECONDS / 60 ))m$(( SECONDS % 60 ))s"; }  # since the script started
stage() { echo; echo "[debug $(clock)] $*"; }

stage "1/6 world: $world"
[ -f "$world/index/manifest.json" ] || asearcher world build --out "$world" --index --overwrite \
  --max-facts-per-passage 1

stage "2/6 tokenizer and tiny policy: $out/model"
[ -f "$out/model/config.json" ] || asearcher init-model --config "$cfg" "model.seed=$seed" \
  --out "$out/model" --tokenizer-corpus "$world" --overwrite
policy=(model.arch=null "model.seed=$seed")

stage "3/6 expert trajectories: $out/expert.jsonl"
# SFT learns from a sample of the train questions and RL from the others: on questions SFT
# trained on, the policy already knows the answers, and RL rewarded recall more than reading.
limit=()
rl_data="$world/qa_train.jsonl"
if [ "${SFT_TRAJ:-1200}" != all ]; then
  rl_data="$out/rl_questions.jsonl"
  limit=(--limit "${SFT_TRAJ:-1200}" --rest "$rl_data")
fi
[ -f "$out/expert.jsonl" ] && [ -f "$rl_data" ] || asearcher world solve --config "$cfg" \
  "${policy[@]}" model.path="$out/model" --world "$world" "${limit[@]}" \
  --out "$out/expert.jsonl" --no-progress

stage "4/6 SFT warm start: $out/sft"
[ -f "$out/sft/config.json" ] || asearcher sft --config "$cfg" "${policy[@]}" \
  model.path="$out/model" --data "$out/expert.jsonl" --out "$out/sft" \
  --epochs "${SFT_EPOCHS:-4}" --batch-rows "${SFT_BATCH_ROWS:-4}"
evaluate() {  # model, output dir, extra flags (k, sampling and concurrency: the config's eval)
  asearcher eval --serve --config "$cfg" "${policy[@]}" model.path="$1" \
    retrieval.index="$world/index" ${EVAL_QUESTIONS:+"eval.limit=$EVAL_QUESTIONS"} \
    --data "$world/qa_test.jsonl" --out "$2" --no-progress "${@:3}"
}
[ -f "$out/eval_sft/report.json" ] || evaluate "$out/sft" "$out/eval_sft"

stage "5/6 asynchronous RL from the SFT policy: $out/rl"
resume=()
[ -d "$out/rl/checkpoints" ] && resume=(--resume)
asearcher train --config "$cfg" "${policy[@]}" model.path="$out/sft" run.output_dir="$out/rl" \
  rl.data="[$rl_data]" retrieval.index="$world/index" \
  "rl.seed=$seed" optimizer.learning_rate=2.5e-4 optimizer.warmup_steps=0 \
  optimizer.decay_steps=null "${resume[@]}" "$@"

stage "6/6 held-out evaluation of the RL policy against the SFT policy"
rm -rf "$out/eval_rl"  # always the policy the RL stage ended with
evaluate "$out/rl/weights" "$out/eval_rl" --baseline "$out/eval_sft/report.json"
echo
echo "[debug] done in $(clock), setup included:" \
  "learning curve $out/rl/learning_curve.png, TensorBoard $out/rl/tensorboard," \
  "evaluations $out/eval_sft and $out/eval_rl, logs $out/rl/logs"
