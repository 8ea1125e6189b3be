"""The asynchronous RL loop as processes: the learner killed with SIGKILL and resumed trains
every group exactly once; a rollout worker killed mid-episode leaves only complete groups; and
`asearcher train` runs end to end on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import child_env

from asearcher_jax.agent import Trajectory
from asearcher_jax.replay import Group, ReplayQueue, ReplayServer, SyncReplayClient
from asearcher_jax.rl.training_log import read_rollout_logs

pytestmark = pytest.mark.e2e

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_ARCH = {"family": "qwen3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
             "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "rope_theta": 10000.0, "tie_embeddings": True, "eos_token_id": 258}


def cli(*args):
  return [sys.executable, "-m", "asearcher_jax.cli", *args]


def read_metrics(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def synthetic_group(i: int, rng) -> Group:
  trajs = []
  for j in range(2):
    n = int(rng.integers(40, 90))
    t = Trajectory(qid=f"q{i}", question="?", answers=["a"], group_id=f"g{i}", sample=j)
    t.tokens = rng.integers(0, 256, n).astype(np.int32)
    t.loss_mask = np.arange(n) >= n // 3
    t.behav_logp = np.where(t.loss_mask, -3.0, 0.0).astype(np.float32)
    t.version = np.where(t.loss_mask, 0, -1).astype(np.int32)
    t.seq_starts = [0]
    t.reward = float(j)
    t.status = "answered"
    trajs.append(t.to_json().encode())
  return Group(group_id=f"g{i}", qid=f"q{i}", submit_version=0, worker="test", cursor=i + 1,
               trajectories=trajs)


def test_learner_killed_and_resumed_trains_every_group_once(tmp_path):
  queue = ReplayQueue(str(tmp_path / "journal"))
  rng = np.random.default_rng(0)
  ids = [f"g{i}" for i in range(12)]
  for i in range(12):
    assert queue.put(synthetic_group(i, rng)) == "accepted"
  config = tmp_path / "learner.yaml"
  config.write_text(yaml.safe_dump({
      "model": {"arch": TINY_ARCH, "dtype": "float32", "attention": "xla"},
      "optimizer": {"learning_rate": 1e-3},
      "checkpoint": {"every_steps": 2, "async_save": False},
      "rl": {"batch_groups": 2, "total_steps": 6, "row_tokens": 256, "micro_batch_rows": 2,
             "lease_timeout_s": 3.0, "max_head_offpolicyness": 100},
      "run": {"output_dir": str(tmp_path / "run")}}))
  metrics = tmp_path / "run" / "metrics.jsonl"
  srv = ReplayServer(queue).start_in_thread()
  try:
    argv = cli("learn", "--config", str(config), "--replay", srv.address)
    proc = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    while len(read_metrics(metrics)) < 3:  # past the step-2 checkpoint, before the next
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, "the learner made no progress"
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = read_metrics(metrics)
    done = subprocess.run(argv + ["--resume"], env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from step" in done.stdout
    stats = SyncReplayClient(srv.address).state()
  finally:
    srv.stop_thread()
  lines = read_metrics(metrics)
  assert [m["step"] for m in first][:3] == [1, 2, 3]
  # The resume dropped the lines of the steps after its checkpoint (step 2), which it trained
  # again: what is left is the trained lineage, one line a step.
  trained = [g for m in lines for g in m["groups"]]
  assert sorted(trained) == sorted(ids), trained  # every group once: none lost, none twice
  assert [m["step"] for m in lines] == list(range(1, 7))
  assert stats.consumed == 12 and stats.queued == 0
  assert all(np.isfinite(m["loss"]) for m in lines)


def test_the_learner_drops_poison_groups_and_trains_the_rest(tmp_path):
  """Groups no step can use (not a record; a token id outside the vocabulary, which once turned
  every parameter into NaN; tokens from a version not yet published) reached the queue past
  its checks (an old journal, say): the learner drops each with its reason, acknowledges it
  with the lease, and trains the rest."""
  queue = ReplayQueue(str(tmp_path / "journal"))
  rng = np.random.default_rng(1)
  good = [synthetic_group(i, rng) for i in range(5)]
  bad = [synthetic_group(10 + i, rng) for i in range(3)]
  record = json.loads(bad[0].trajectories[0])
  bad[0].trajectories[0] = json.dumps({**record, "tokens": [10**6] * len(record["tokens"])}
                                      ).encode()
  bad[1].trajectories[1] = b"\xff not a record"
  future = [-1 if v < 0 else 500_000 for v in record["version"]]  # staleness -500,000
  bad[2].trajectories[0] = json.dumps({**record, "version": future}).encode()
  for g in (good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], good[4]):  # by twos
    assert queue.put(g) == "accepted"
  config = tmp_path / "learner.yaml"
  config.write_text(yaml.safe_dump({
      "model": {"arch": TINY_ARCH, "dtype": "float32", "attention": "xla"},
      "optimizer": {"learning_rate": 1e-3}, "checkpoint": {"every_steps": 3, "async_save": False},
      "rl": {"batch_groups": 2, "total_steps": 4, "row_tokens": 256, "micro_batch_rows": 2,
             "max_head_offpolicyness": 100},
      "run": {"output_dir": str(tmp_path / "run")}}))
  srv = ReplayServer(queue).start_in_thread()
  try:
    done = subprocess.run(cli("learn", "--config", str(config), "--replay", srv.address),
                          env=child_env(), capture_output=True, text=True, timeout=300)
    stats = SyncReplayClient(srv.address).state()
  finally:
    srv.stop_thread()
  assert done.returncode == 0, done.stdout + done.stderr
  for reason in ("outside the vocabulary", "not a JSON trajectory record", "version 500000"):
    assert reason in done.stderr
  lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
  assert sorted(g for m in lines for g in m["groups"]) == sorted(g.group_id for g in good)
  assert lines[-1]["dropped_groups"] == 3 and all(np.isfinite(m["loss"]) for m in lines)
  assert stats.consumed == 8 and stats.queued == 0


TRAIN_OVERRIDES = ["model.arch.num_layers=2", "rl.group_size=2", "rl.batch_groups=2",
                   "agent.max_turns=2", "agent.max_new_tokens=16",
                   "rl.filter_equal_rewards=false", "checkpoint.every_steps=2",
                   "serve.max_len=2048", "agent.max_context_tokens=2048", "rl.row_tokens=2048"]


def test_asearcher_train_runs_and_resumes(tmp_path):
  """The launcher on the debug config (a random tiny policy; every group kept): versions advance,
  the decode server serves each new version, metrics, TensorBoard events and checkpoints are
  written, and --resume continues."""
  run = tmp_path / "run"
  e = child_env(ASEARCHER_CACHE=str(tmp_path / "cache"))

  def train(*extra):
    return subprocess.run(cli("train", "--config", "configs/debug.yaml", "--no-progress",
                              *TRAIN_OVERRIDES, f"run.output_dir={run}", *extra),
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)

  # A run stopped before its learner's first checkpoint (its folder holds an empty checkpoints/
  # and nothing was published) is resumed like any other; --resume waited 900 s for a
  # publication that such a learner never makes.
  (run / "checkpoints").mkdir(parents=True)
  refused = train("rl.total_steps=3")
  assert refused.returncode == 2 and "pass --resume" in refused.stderr
  out = train("rl.total_steps=3", "--resume")
  assert out.returncode == 0, out.stdout + out.stderr
  assert "step 3/3 v3" in out.stdout
  lines = read_metrics(run / "metrics.jsonl")
  assert [m["version"] for m in lines] == [1, 2, 3]
  assert [m["served_version"] for m in lines] == [1, 2, 3]  # the decode server has each one
  assert all(m["trajectories"] == 4 and np.isfinite(m["loss"]) for m in lines)
  assert all(0 <= m["staleness_max"] <= 2 for m in lines)  # η = 2 in configs/debug.yaml
  assert os.listdir(run / "tensorboard") and sorted(os.listdir(run / "checkpoints")) == ["2", "3"]
  scored = read_rollout_logs(str(run))  # every group the worker scored, for the curve
  assert len(scored) >= 6 and not any(g["filtered"] for g in scored)
  assert {g["version"] for g in scored} <= {0, 1, 2, 3}
  clobber = train("rl.total_steps=3")  # without --resume a finished run is not overwritten
  assert clobber.returncode == 2 and "pass --resume" in clobber.stderr
  again = train("rl.total_steps=4", "--resume")
  assert again.returncode == 0, again.stdout + again.stderr
  assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_rollout_worker_that_keeps_failing_fails_the_run(tmp_path):
  """A worker that dies at every start (its data is missing) is restarted, then reported, and
  the run exits 1: a failure, not the 130 of an interrupted run that scripts take for Ctrl-C."""
  out = subprocess.run(cli("train", "--config", "configs/debug.yaml", "--no-progress",
                           *TRAIN_OVERRIDES, f"rl.data=[{tmp_path / 'missing.jsonl'}]",
                           f"run.output_dir={tmp_path / 'run'}"),
                       cwd=ROOT, env=child_env(ASEARCHER_CACHE=str(tmp_path / "cache")),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stdout + out.stderr
  assert "rollout0 keeps failing" in out.stdout and "missing.jsonl: no such file" in out.stdout


def test_a_rollout_worker_killed_mid_episode_leaves_only_complete_groups(tmp_path):
  from conftest import single_device_mesh

  from asearcher_jax.inference import Driver, Engine
  from asearcher_jax.inference.server import DecodeServer
  from asearcher_jax.models import QwenConfig, build_tokenizer, create_model
  from asearcher_jax.tools.index import SearchIndex, build_index
  from asearcher_jax.tools.retrieval_server import ServerThread, create_app
  from asearcher_jax.world import WorldConfig, generate_world, write_world

  world = tmp_path / "world"
  write_world(generate_world(WorldConfig(seed=3, num_people=30, num_cities=8, num_orgs=6,
                                         num_works=6, num_countries=3, questions_per_hop=8)),
              str(world))
  build_index(str(world / "corpus.jsonl"), str(world / "index"),
              pages=str(world / "pages.jsonl"), log=lambda *_: None)
  tok = build_tokenizer()
  model = create_model(QwenConfig(**TINY_ARCH), single_device_mesh(), seed=0, dtype="float32")
  decode = DecodeServer(Driver(Engine(model, slots=8, max_len=2048, mesh=single_device_mesh()),
                               tokenizer=tok), tok, grpc_port=0, http_port=None,
                        default_stop_ids=(tok.eos_id,)).start_in_thread()
  queue = ReplayQueue(str(tmp_path / "journal"))
  replay = ReplayServer(queue).start_in_thread()
  config = tmp_path / "rollout.yaml"
  config.write_text(yaml.safe_dump({
      "model": {"arch": TINY_ARCH},
      "agent": {"max_turns": 3, "max_new_tokens": 24, "max_context_tokens": 2000},
      "rl": {"group_size": 3, "batch_groups": 2, "max_head_offpolicyness": 100,
             "max_concurrent_groups": 2, "filter_equal_rewards": False,
             "data": [str(world / "qa_train.jsonl")]}}))
  try:
    with ServerThread(create_app(SearchIndex(str(world / "index")))) as search:
      argv = cli("rollout", "--config", str(config), f"search.url=http://127.0.0.1:{search.port}",
                 f"run.output_dir={tmp_path / 'run'}", "--replay", replay.address, "--decode",
                 decode.grpc_address)
      proc = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
      deadline = time.monotonic() + 240
      while queue.stats()["accepted_total"] < 2 or decode.driver.stats().slots_in_use == 0:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no groups from the rollout worker"
        time.sleep(0.05)
      proc.send_signal(signal.SIGKILL)  # with episodes running
      proc.wait()
      first = queue.stats()["accepted_total"]
      cursor = queue.worker_state("w0")[1]
      held = queue.lease(first, 600)  # the first run's groups, set apart
      again = subprocess.run(argv + ["--max-groups", "2"], env=child_env(), capture_output=True,
                             text=True, timeout=300)
      assert again.returncode == 0, again.stdout + again.stderr
  finally:
    replay.stop_thread()
    decode.stop_thread()
  total = queue.stats()["accepted_total"]
  assert total == first + 2
  assert queue.worker_state("w0")[0] == total  # the restarted worker knew what was accepted
  later = queue.lease(2, 60)
  groups = held.groups + later.groups
  assert len({g.group_id for g in groups}) == total
  for g in groups:  # whole groups only: G complete, checkable episodes each
    assert len(g.trajectories) == 3
    for raw in g.trajectories:
      t = Trajectory.from_record(raw)
      t.check()
      assert t.status != "aborted" and t.group_id == g.group_id and t.loss_tokens > 0
  # The restarted worker went on from its recorded data cursor, not from the start.
  assert all(int(g.group_id.split("-")[1]) >= cursor for g in later.groups)
