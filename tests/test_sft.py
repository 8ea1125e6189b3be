"""`asearcher sft`: fine-tuning on trajectory files, the loss on the agent's tokens only."""

import json
import logging
import re
import subprocess
import sys

import numpy as np
import yaml
from conftest import child_env, single_device_mesh

from asearcher_jax.agent import Trajectory, write_jsonl
from asearcher_jax.models import from_pretrained
from asearcher_jax.train.sft import sft_rows

ARCH = {"family": "qwen3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "rope_theta": 10000.0, "tie_embeddings": True, "eos_token_id": 258}


def record(prompt, answer, rng):
  """Prompt and tool tokens (mask 0, arbitrary) around the agent's answer (mask 1)."""
  tool = rng.integers(0, 256, 7).tolist()
  t = Trajectory(qid="q", question="?", answers=["a"], status="answered")
  t.record_call(prompt, answer, [-1.0] * len(answer), [0] * len(answer))
  t.record_call(prompt + answer + tool, answer[::-1], [-1.0] * len(answer), [0] * len(answer))
  return t


def test_count_turns_counts_runs_of_agent_tokens_and_whole_greedy_matches():
  from asearcher_jax.train.sft import count_turns
  weight = np.array([[0, 1, 1, 0, 0, 1, 1, 1], [1, 1, 0, 1, 0, 0, 0, 1]], bool)
  hit = np.array([[0, 1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0]], bool)
  # row 0: turns [1,3) whole, [5,8) missed at 6; row 1: [0,2) and [3,4) whole, [7,8) missed
  assert count_turns(weight, hit) == (5, 3)
  assert count_turns(np.zeros((2, 8), bool), hit) == (0, 0)


def test_sequences_longer_than_a_row_are_cut_and_the_loss_tokens_lost_are_reported(
    tmp_path, caplog):
  rng = np.random.default_rng(0)
  data = tmp_path / "long.jsonl"
  write_jsonl(str(data), [record(rng.integers(0, 256, 40).tolist(), [5] * 10, rng),
                          record([1, 2, 3], [4, 5], rng)])
  with caplog.at_level(logging.WARNING):
    rows, n = sft_rows([str(data)], 64)
  # Each record is one sequence (its second call extends the first): the long one's
  # 40 + 10 + 7 + 10 = 67 tokens lose their last 3, answer tokens; of 2 x 10 + 2 x 2 = 24 loss
  # tokens 21 are kept.
  assert n == 2 and int(rows["loss_mask"].sum()) == 21
  assert "1 sequences are longer than a row of 64 tokens" in caplog.text
  assert "their last 3 of all 24 loss tokens are not trained" in caplog.text


def test_sft_learns_the_agent_tokens_and_writes_a_loadable_policy(tmp_path):
  rng = np.random.default_rng(0)
  cases = [(rng.integers(0, 256, 12).tolist(), rng.integers(0, 256, 6).tolist())
           for _ in range(3)]
  data = tmp_path / "expert.jsonl"
  write_jsonl(str(data), [record(p, a, rng) for p, a in cases])
  text_only = tmp_path / "text.jsonl"
  write_jsonl(str(text_only), [Trajectory(qid="q", question="?", answers=["a"])])
  config = tmp_path / "sft.yaml"
  config.write_text(yaml.safe_dump({
      "model": {"arch": ARCH, "dtype": "float32", "attention": "xla"},
      "optimizer": {"learning_rate": 3e-3, "weight_decay": 0.0}, "rl": {"row_tokens": 64}}))
  env = child_env()

  def sft(*args):
    return subprocess.run([sys.executable, "-m", "asearcher_jax.cli", "sft", "--config",
                           str(config), "--no-progress", *args], env=env, capture_output=True,
                          text=True, timeout=300)

  out = sft("--data", str(data), "--out", str(tmp_path / "policy"), "--epochs", "150",
            "--eval-data", str(data), "--eval-every", "50")
  assert out.returncode == 0, out.stdout + out.stderr
  first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
  assert last < 0.05 < first
  # Held-out evaluation (here on the training records) before training and every 50 steps:
  # the untrained policy reproduces none of the 6 agent turns, the trained one all of them.
  evals = [(int(k), float(loss), float(turns)) for k, loss, turns in re.findall(
      r"step (\d+): held-out loss ([\d.]+), token accuracy [\d.]+%, turns reproduced "
      r"([\d.]+)% of 6", out.stdout)]
  assert [k for k, _, _ in evals] == [0, 50, 100, 150], out.stdout
  assert evals[0][2] == 0.0 and evals[-1][2] == 100.0
  assert evals[-1][1] < 0.05 < evals[0][1]
  model, tok, _ = from_pretrained(str(tmp_path / "policy"), single_device_mesh(),
                                  dtype="float32", progress=False)
  assert tok is not None
  # The agent's tokens were learned (greedy continuation of a prompt gives its answer); the
  # tool tokens, outside the loss mask, were not.
  prompt, answer = cases[0]
  ids = list(prompt)
  for _ in range(len(answer)):
    logits, _ = model(np.asarray([ids]))
    ids.append(int(np.argmax(np.asarray(logits)[0, -1])))
  assert ids[len(prompt):] == answer
  bad = sft("--data", str(text_only), "--out", str(tmp_path / "x"))
  assert bad.returncode == 2 and "no trainable tokens" in bad.stderr
  missing = sft("--data", str(tmp_path / "typo.jsonl"), "--out", str(tmp_path / "x"))
  assert missing.returncode == 2 and "typo.jsonl: no such trajectory file" in missing.stderr
  # An --out that holds something is refused before any training (it was replaced, whatever
  # it held); a file there, and no epochs, are usage errors rather than tracebacks.
  again = sft("--data", str(data), "--out", str(tmp_path / "policy"))
  assert again.returncode == 2 and "exists and is not empty (use --overwrite" in again.stderr
  assert (tmp_path / "policy" / "config.json").exists()
  a_file = sft("--data", str(data), "--out", str(data))
  assert a_file.returncode == 2 and "is a file, not a directory" in a_file.stderr
  none = sft("--data", str(data), "--out", str(tmp_path / "y"), "--epochs", "0")
  assert none.returncode == 2 and "must be at least 1, got 0" in none.stderr
  assert json.loads((tmp_path / "policy" / "config.json").read_text())["num_hidden_layers"] == 2


def test_sft_plans_remat_for_a_process_alone_on_its_devices(tmp_path):
  """SFT runs alone, but chose its remat with the colocated learner's share of a device
  (0.9 x 0.6), recomputing activations it had room to keep."""
  from asearcher_jax.config import load_config
  from asearcher_jax.memory_plan import GiB, plan, with_remat
  overrides = [f"model.arch={json.dumps(ARCH)}", "model.dtype=float32", "model.remat=auto",
               "rl.row_tokens=64", "rl.micro_batch_rows=2", "placement.mode=disaggregated"]
  need = plan(with_remat(load_config(None, overrides), "none"), platform="cpu",
              devices=1).groups[0].total
  gib = need / 0.9 / GiB * 1.05  # fits 0.9 of the device, not the colocated 0.54 of it
  rng = np.random.default_rng(0)
  data = tmp_path / "expert.jsonl"
  write_jsonl(str(data), [record(rng.integers(0, 256, 12).tolist(),
                                 rng.integers(0, 256, 6).tolist(), rng)])
  out = subprocess.run(
      [sys.executable, "-m", "asearcher_jax.cli", "sft", "--no-progress", "--data", str(data),
       "--out", str(tmp_path / "policy"), "--epochs", "1", "--batch-rows", "2",
       *overrides[:-1], "placement.num_devices=1", f"placement.device_memory_gib={gib}"],
      env=child_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "model.remat auto: none" in out.stdout
