"""The README's main command, shortened: launch/debug.sh end to end (world, tokenizer and tiny
model, expert trajectories, SFT, evaluation, asynchronous RL, evaluation against SFT) with a
few questions and two RL steps, checking that every stage leaves its artifacts."""

import json
import os
import subprocess
import sys

import pytest
from conftest import child_env

from asearcher_jax.agent.trajectory import read_jsonl
from asearcher_jax.models.tokenizer import Tokenizer
from asearcher_jax.rl.training_log import read_rollout_logs

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("debug") / "run")
  env = child_env(OUT_DIR=out, ASEARCHER_VENV=sys.prefix, SFT_TRAJ="24", SFT_EPOCHS="1",
                  EVAL_QUESTIONS="3", SEED="3")
  # Two RL steps of two groups of two; an SFT policy this brief rarely earns reward and runs
  # every episode to the turn limit, so keep equal-reward groups and make few episodes.
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "debug.sh"), "rl.total_steps=2",
                         "rl.group_size=2", "rl.batch_groups=2", "rl.filter_equal_rewards=false",
                         "checkpoint.every_steps=1"],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return out, proc.stdout


def test_world_tokenizer_and_model_are_built(run):
  out, _ = run
  assert os.path.exists(os.path.join(out, "world", "index", "manifest.json"))
  tok = Tokenizer.from_dir(os.path.join(out, "model"))
  with open(os.path.join(out, "model", "config.json")) as f:
    config = json.load(f)
  assert 1024 < tok.vocab_size <= config["vocab_size"] == 4096  # merges learned, ids fit the rows
  assert config["eos_token_id"] == tok.eos_id


def test_expert_trajectories_earn_full_reward_and_rl_gets_the_other_questions(run):
  out, _ = run
  trajs = read_jsonl(os.path.join(out, "expert.jsonl"))
  assert len(trajs) == 24
  for t in trajs:
    t.check()
    assert t.reward == 1.0 and t.status == "answered"
  with open(os.path.join(out, "world", "qa_train.jsonl")) as f:
    train = [json.loads(line) for line in f]
  with open(os.path.join(out, "rl_questions.jsonl")) as f:
    rl = [json.loads(line) for line in f]
  assert rl == [r for r in train if r["qid"] not in {t.qid for t in trajs}]
  assert len(rl) == len(train) - 24
  with open(os.path.join(out, "rl", "logs", "learner.log")) as f:
    assert "rl_questions.jsonl" in f.read()


def test_the_seed_reaches_every_stage(run):
  """SEED=3 made the policy (init-model with model.seed=3 makes the same bytes, seed 4 others)
  and reached the RL stage."""
  out, _ = run

  def init_model(seed: int) -> bytes:
    path = os.path.join(os.path.dirname(out), f"model_seed{seed}")
    subprocess.run([sys.executable, "-m", "asearcher_jax.cli", "init-model", "--config",
                    os.path.join(ROOT, "configs", "debug.yaml"), f"model.seed={seed}", "--out",
                    path, "--tokenizer-corpus", os.path.join(out, "world"), "--overwrite"],
                   check=True, capture_output=True)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
      return f.read()

  with open(os.path.join(out, "model", "model.safetensors"), "rb") as f:
    made = f.read()
  assert init_model(3) == made and init_model(4) != made
  with open(os.path.join(out, "rl", "logs", "learner.log")) as f:
    assert "rl.seed=3" in f.read()


def test_sft_rl_and_both_evaluations_leave_their_artifacts(run):
  out, stdout = run
  assert os.path.exists(os.path.join(out, "sft", "config.json"))
  rl = os.path.join(out, "rl")
  with open(os.path.join(rl, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2]
  assert sorted(os.listdir(os.path.join(rl, "checkpoints")))[-1].endswith("2")
  assert os.listdir(os.path.join(rl, "weights"))
  assert len(read_rollout_logs(rl)) >= 4  # every group scored: 2 steps x 2 trained, at least
  with open(os.path.join(rl, "learning_curve.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(rl,
                                                                                  "tensorboard")))
  for name in ("eval_sft", "eval_rl"):
    with open(os.path.join(out, name, "report.json")) as f:
      report = json.load(f)
    assert report["k"] == 4
    [ds] = report["datasets"].values()
    assert ds["questions"] == 3 and ds["samples"] == 12
  assert "against" in stdout and "change" in stdout  # RL compared with SFT
  assert "learning curve" in stdout
