"""What the learner logs is what it trained: the step's metrics cover the groups it trained on
(not those dropped stale), a skipped update adds nothing to them, a resume drops the lines of
the steps it trains again, and the clip fraction follows AReaL's definition."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh

from asearcher_jax.agent import Trajectory
from asearcher_jax.config import Config
from asearcher_jax.models.pretrained import load_policy
from asearcher_jax.replay import Group, ReplayQueue
from asearcher_jax.replay.local import LocalReplay
from asearcher_jax.replay.validate import decode_trajectory
from asearcher_jax.rl.batch import build_batch
from asearcher_jax.rl.learner import Learner
from asearcher_jax.rl.loss import decoupled_ppo_loss, finalize_stats
from asearcher_jax.rl.plot import plot_metrics
from asearcher_jax.rl.step import make_ppo_step
from asearcher_jax.train.optimizer import make_optimizer

ARCH = {"family": "qwen3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
        "tie_embeddings": True, "eos_token_id": 127}


def group(i: int, version: int = 0, rewards=(0.0, 1.0), n: int = 40) -> Group:
  rng = np.random.default_rng(i)
  trajs = []
  for j, r in enumerate(rewards):
    t = Trajectory(qid=f"q{i}", question="?", answers=["a"], group_id=f"g{i}", sample=j)
    t.tokens = rng.integers(0, 100, n).astype(np.int32)
    t.loss_mask = np.arange(n) >= 13
    t.behav_logp = np.where(t.loss_mask, -3.0, 0.0).astype(np.float32)
    t.version = np.where(t.loss_mask, version, -1).astype(np.int32)
    t.seq_starts, t.reward, t.status = [0], float(r), "answered"
    trajs.append(t.to_record())
  return Group(group_id=f"g{i}", qid=f"q{i}", submit_version=version, worker="w0", cursor=i + 1,
               trajectories=trajs)


class NoServers:
  def publish(self, version, params):
    return {}

  def served(self):
    return 0

  def close(self):
    pass


def config(out, every: int = 1, **rl) -> Config:
  rl = {"batch_groups": 1, "total_steps": 4, "row_tokens": 64, "micro_batch_rows": 1,
        "max_head_offpolicyness": 100, **rl}
  return Config(model={"arch": ARCH, "dtype": "float32", "attention": "xla", "remat": "none"},
                optimizer={"learning_rate": 1e-3}, rl=rl, run={"output_dir": str(out)},
                checkpoint={"every_steps": every, "async_save": False})


def learner(cfg: Config, queue: ReplayQueue, out) -> Learner:
  model, _, _ = load_policy(cfg.model, single_device_mesh(), progress=False)
  return Learner(cfg, model=model, replay=LocalReplay(queue), publisher=NoServers(),
                 out_dir=str(out), echo=lambda s: None)


def metrics(out) -> list[dict]:
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_step_reports_the_groups_it_trained_not_those_dropped_stale(tmp_path):
  cfg = config(tmp_path, batch_groups=2, max_head_offpolicyness=0, stale_policy="drop")
  queue = ReplayQueue(str(tmp_path / "journal"))
  queue.put(group(0))
  queue.put(group(1))
  lrn = learner(cfg, queue, tmp_path)
  lrn.run(steps=1)  # now at version 1: a version-0 token is stale
  queue.put(group(2, version=1, rewards=(0.0, 1.0), n=40))
  queue.put(group(3, version=0, rewards=(1.0, 1.0), n=200))  # stale: dropped
  lrn.run(steps=1)
  m = metrics(tmp_path)[-1]
  assert m["groups"] == ["g2"] and m["groups_dropped_stale"] == m["dropped_groups"] == 1
  assert (m["reward"], m["success"], m["episode_tokens"]) == (0.5, 0.5, 40.0)
  # A lease whose every group is stale trains nothing: no step, no new version to publish.
  queue.put(group(4, version=0))
  queue.put(group(5, version=0))
  queue.put(group(6, version=2))
  queue.put(group(7, version=2))
  lrn.run(steps=1)
  rows = metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["groups"] == ["g6", "g7"]
  assert rows[-1]["version"] == 3 and rows[-1]["dropped_groups"] == 3
  lrn.close()


def test_a_resume_drops_the_lines_of_the_steps_it_trains_again(tmp_path):
  cfg = config(tmp_path, total_steps=5, every=2)
  queue = ReplayQueue(str(tmp_path / "journal"))
  for i in range(8):
    queue.put(group(i))
  first = learner(cfg, queue, tmp_path)
  leases, lease = [], first._lease

  def killed_at_the_fourth_lease():
    leases.append(1)
    if len(leases) == 4:
      raise KeyboardInterrupt  # the process dies: step 3 was trained after the last checkpoint
    return lease()

  first._lease = killed_at_the_fourth_lease
  with pytest.raises(KeyboardInterrupt):
    first.run()
  first.metrics.close()
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
  second = learner(cfg, queue, tmp_path)
  assert second.restore()
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
  second.run()
  second.close()
  rows = metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  loss = tensorboard_scalars(tmp_path / "tensorboard", "loss")
  assert sorted(loss) == [1, 2, 3, 4, 5]
  assert np.isclose(loss[3], rows[2]["loss"], rtol=1e-6)  # the trained lineage's step 3


def tensorboard_scalars(logdir, tag: str) -> dict[int, float]:
  """`tag`'s values by step as TensorBoard shows them: files in the order written, and a
  SessionLog START at step s (a writer's purge_step) hides what came before it at steps >= s."""
  import struct

  from tensorboardX.proto import event_pb2
  values: dict[int, float] = {}
  files = sorted(os.listdir(logdir), key=lambda n: [int(p) for p in n.split(".") if p.isdigit()])
  for name in files:
    data = open(os.path.join(logdir, name), "rb").read()
    at = 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 16 + n
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        values = {s: v for s, v in values.items() if s < event.step}
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = v.simple_value
  return values


def test_a_skipped_update_adds_nothing_to_the_steps_figures(tmp_path):
  cfg = config(tmp_path, ppo_n_minibatches=2)
  groups = [[decode_trajectory(b, "t") for b in group(i, n=40 + 10 * i).trajectories]
            for i in range(2)]
  batch, _ = build_batch(groups, cfg.rl, learner_version=0)
  half = batch.shape[0] // 2

  def step(b):
    model, _, _ = load_policy(cfg.model, single_device_mesh(), progress=False)
    params, opt, fn = make_ppo_step(model, make_optimizer(cfg.optimizer, 10), cfg.rl)
    return {k: float(v) for k, v in jax.device_get(fn(params, opt, b)[2]).items()}

  adv = np.array(batch.advantages)
  adv[half:] = np.where(batch.loss_mask[half:], np.inf, 0.0)  # the second update's loss: inf
  skipped = step(dataclasses.replace(batch, advantages=adv))
  mask = np.array(batch.loss_mask)
  mask[half:] = False  # the first update alone
  alone = step(dataclasses.replace(batch, loss_mask=mask,
                                   num_tokens=np.asarray(mask.sum(), np.int32)))
  assert skipped["nonfinite_updates"] == 1 and alone["nonfinite_updates"] == 0
  for k in ("num_tokens", "loss", "grad_norm", "entropy", "approx_kl", "ratio_mean",
            "clip_frac"):
    assert np.isclose(skipped[k], alone[k], rtol=1e-6, atol=0), k
  assert all(np.isfinite(v) for v in skipped.values())


def test_clip_fraction_counts_clipped_loss_tokens_capped_or_not():
  """AReaL's clip_mask & loss_mask over loss tokens: four tokens above 1 + eps with positive
  advantages, two of them over the behaviour-weight cap, are all clipped."""
  logp = jnp.log(jnp.full(4, 0.3))
  prox = logp - jnp.log(1.5)
  behav = prox - jnp.array([3.0, 3.0, 0.0, 0.0])  # w = e^3 > 5 for the first two
  _, stats = decoupled_ppo_loss(logp, prox, behav, jnp.ones(4), jnp.ones(4, bool), eps_clip=0.2,
                                behav_weight_cap=5.0, num_tokens=4)
  assert float(stats["capped"]) == 2
  assert float(finalize_stats(stats)["clip_frac"]) == 1.0


def test_a_nan_point_does_not_blank_the_learning_curve(tmp_path, monkeypatch):
  import asearcher_jax.rl.plot as plot
  drawn = {}
  monkeypatch.setattr(plot, "draw", lambda ax, xs, ys, window, label: drawn.setdefault(label, ys))
  rows = [{"step": i, "entropy": float("nan") if i == 5 else 1.0 + i} for i in range(1, 41)]
  assert plot_metrics(rows, str(tmp_path / "curve.png"), title="t")
  ys = drawn["entropy (nats/token)"]
  assert len(ys) == 39 and all(np.isfinite(plot.smooth(list(ys), 4)))
