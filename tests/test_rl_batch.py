"""Trajectories -> packed micro-batches (build_batch), and the PPO step's layout invariances:
packed vs padded rows, any micro-batch split, 1 vs 8 devices give the same loss and update."""

import dataclasses
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.agent.trajectory import Trajectory
from asearcher_jax.inference.sampling import processed_logits
from asearcher_jax.models import create_model
from asearcher_jax.models.params import flat_state
from asearcher_jax.rl import RLSection, TrainBatch, batch_normalize, build_batch, shard_batch
from asearcher_jax.rl.advantages import group_advantages
from asearcher_jax.rl.loss import finalize_stats
from asearcher_jax.rl.step import make_ppo_loss, make_ppo_step
from asearcher_jax.sharding import make_mesh


def _traj(calls, reward, sample=0):
  """calls: (context, output, versions); behaviour log-prob of token i is −i/1000 (traceable)."""
  t = Trajectory(qid="q", question="q", answers=["a"], sample=sample, reward=reward)
  for context, output, versions in calls:
    t.record_call(list(context), list(output), [-o / 1000 for o in output], list(versions))
  return t


def _fresh(n, _ids=itertools.count(1000)):
  return [next(_ids) for _ in range(n)]


def _groups(version=5):
  """Two groups of three; some trajectories have two sequences (a rewritten context)."""
  groups = []
  for g, rewards in enumerate([[1.0, 0.0, 0.5], [0.2, 0.2, 0.9]]):
    group = []
    for i, r in enumerate(rewards):
      prompt = _fresh(2 + i)
      out1 = _fresh(3 + i)  # at most 4 + 5 + 2 + 3 = 14 tokens a sequence: no truncation
      calls = [(prompt, out1, [version] * len(out1))]
      if (g + i) % 2:  # a second turn extending the context, then a rewritten context
        tool = _fresh(2)
        out2 = _fresh(3)
        calls.append((prompt + out1 + tool, out2, [version - 1] * 3))
        out3 = _fresh(2)
        calls.append((prompt + _fresh(1), out3, [version] * 2))
      group.append(_traj(calls, r, sample=i))
    groups.append(group)
  return groups


def _cfg(**kw):
  base = dict(row_tokens=16, micro_batch_rows=2, adv_batch_norm=False, max_head_offpolicyness=4)
  base.update(kw)
  return RLSection(**base)


def _loss_tokens(batch: TrainBatch):
  """{token id: (behav_logp, version, advantage)} over the loss tokens; asserts each is once."""
  out = {}
  sel = np.asarray(batch.loss_mask)
  for name in ("tokens", "behav_logp", "versions", "advantages"):
    assert np.asarray(getattr(batch, name)).shape == sel.shape
  for tok, b, v, a in zip(np.asarray(batch.tokens)[sel], np.asarray(batch.behav_logp)[sel],
                          np.asarray(batch.versions)[sel], np.asarray(batch.advantages)[sel]):
    assert int(tok) not in out, f"token {tok} trained twice"
    out[int(tok)] = (float(b), int(v), float(a))
  return out


def _segments(batch: TrainBatch, micro_batches=slice(None)):
  """Every packed sequence (of some micro-batches) as a tuple of tokens, checking positions
  restart at 0."""
  seqs = []
  tokens, pos, seg = (np.asarray(x)[micro_batches].reshape(-1, x.shape[-1])
                      for x in (batch.tokens, batch.positions, batch.segment_ids))
  for r in range(len(tokens)):
    for s in range(1, seg[r].max() + 1):
      idx = np.flatnonzero(seg[r] == s)
      assert (np.diff(idx) == 1).all() and (pos[r, idx] == np.arange(len(idx))).all()
      seqs.append(tuple(tokens[r, idx]))
  return seqs


@pytest.mark.parametrize("norm", [False, True])
def test_packing_keeps_every_loss_token_once_with_its_data(norm):
  groups = _groups()
  batch, info = build_batch(groups, _cfg(adv_batch_norm=norm), learner_version=6)
  m, r, t = batch.shape
  assert r == 2 and t == 16 and info["micro_batches"] == m and info["rows"] == m * r
  assert m & (m - 1) == 0  # a power of two: few distinct step shapes
  used = int((np.asarray(batch.segment_ids).max(-1) > 0).sum())
  assert used == info["rows"] - info["empty_rows"] and m // 2 * r < used  # no spare micro-batch
  # what must come out: every sampled token, with its group-centred advantage
  expected = {}
  for group in groups:
    adv = group_advantages([tr.reward for tr in group])
    for tr, a in zip(group, adv):
      for i in np.flatnonzero(tr.loss_mask):
        expected[int(tr.tokens[i])] = (float(tr.behav_logp[i]), int(tr.version[i]), float(a))
  if norm:
    ids = list(expected)
    z = batch_normalize([expected[i][2] for i in ids], np.ones(len(ids)))
    expected = {i: (*expected[i][:2], float(a)) for i, a in zip(ids, z)}
  got = _loss_tokens(batch)
  assert set(got) == set(expected) and int(batch.num_tokens) == len(expected)
  for k, (b, v, a) in expected.items():
    assert got[k][0] == pytest.approx(b) and got[k][1] == v
    assert got[k][2] == pytest.approx(a, abs=1e-6)
  # every sequence of every record is packed exactly once, whole
  records = sorted(tuple(tr.tokens[s]) for g in groups for tr in g for s in tr.sequences())
  assert sorted(_segments(batch)) == records
  # padding rows are empty and the histogram counts lag 6 − version over loss tokens
  assert info["staleness_hist"] == {
      lag: sum(v == 6 - lag for _, v, _ in expected.values()) for lag in (1, 2)}
  assert info["num_tokens"] == len(expected) and info["groups_used"] == 2


def test_first_token_of_a_sequence_leaves_the_loss_mask():
  t = _traj([([], [7, 8, 9], [3, 3, 3])], 1.0)  # no prompt: token 7 has no predecessor
  t2 = _traj([([1], [2], [3])], 0.0)
  batch, info = build_batch([[t, t2]], _cfg(), learner_version=3)
  assert set(_loss_tokens(batch)) == {8, 9, 2} and info["tokens_unpredictable"] == 1


def test_staleness_guard_drop_and_mask():
  # learner version 10, η_tok = 2: a loss token older than version 8 is stale
  old = [_traj([([1, 2], [11, 12], [7, 9])], 1.0), _traj([([1, 2], [13], [9])], 0.0)]
  fresh = [_traj([([1, 2], [21, 22], [8, 10])], 1.0), _traj([([3], [23], [10])], 0.0)]
  cfg = _cfg(max_token_staleness=2, stale_policy="drop")
  batch, info = build_batch([old, fresh], cfg, learner_version=10)
  assert set(_loss_tokens(batch)) == {21, 22, 23}  # the whole `old` group went
  assert info["groups_dropped_stale"] == 1 and info["tokens_dropped_stale"] == 3
  assert info["staleness_hist"] == {0: 2, 2: 1} and info["staleness_max"] == 2

  batch, info = build_batch([old, fresh], cfg.model_copy(update={"stale_policy": "mask"}),
                            learner_version=10)
  got = _loss_tokens(batch)
  assert set(got) == {12, 13, 21, 22, 23}  # only token 11 (version 7) left the loss
  assert info["groups_dropped_stale"] == 0 and info["tokens_masked_stale"] == 1
  assert got[12][2] == pytest.approx(0.5)  # advantages still from the whole group: 1 − 0.5
  assert all(10 - v <= 2 for _, v, _ in got.values())

  # default η_tok is max_head_offpolicyness (1 here): version 8 is now stale too
  batch, info = build_batch([old, fresh], _cfg(max_head_offpolicyness=1, stale_policy="drop"),
                            learner_version=10)
  assert info["groups_dropped_stale"] == 2 and int(batch.num_tokens) == 0
  assert batch.shape == (1, 2, 16) and not np.asarray(batch.segment_ids).any()


def test_an_unsound_trajectory_is_refused_by_its_one_check():
  t = _traj([([1, 2], [3, 4], [1, 1])], 1.0, sample=4)
  t.seq_starts = [0, 2, 2]
  with pytest.raises(ValueError, match=r"trajectory 'q'/4: bad seq_starts \[0, 2, 2\]"):
    build_batch([[t]], _cfg(), learner_version=1)


def test_overlong_sequence_is_truncated_and_counted(caplog):
  long = _traj([(list(range(1, 11)), list(range(11, 41)), [1] * 30)], 1.0)  # 40 tokens
  short = _traj([([1, 2], [50, 51], [1, 1])], 0.0)
  with caplog.at_level(logging.WARNING):
    batch, info = build_batch([[long, short]], _cfg(), learner_version=1)
  assert info["sequences_truncated"] == 1 and info["tokens_truncated"] == 24  # 30 − (16 − 10)
  assert set(_loss_tokens(batch)) == set(range(11, 17)) | {50, 51}
  assert "truncated" in caplog.text


# -- the step -------------------------------------------------------------------------------

MODEL = tiny_config()
STEP_CFG = RLSection(row_tokens=16, micro_batch_rows=2, temperature=0.7, eps_clip=0.2,
                     behav_weight_cap=1.5, adv_batch_norm=True)


def _model_groups(seed=0, context=(2, 6)):
  """Random trajectories over the tiny vocabulary, behaviour log-probs near uniform's −4.6 so
  that some behaviour weights pass the cap of 1.5; contexts of `context` [low, high) tokens."""
  rng = np.random.default_rng(seed)
  groups = []
  for g in range(2):
    group = []
    for i in range(3):
      t = Trajectory(qid=f"q{g}", question="q", answers=["a"], sample=i,
                     reward=float(rng.random()))
      for _ in range(1 + (i % 2)):
        ctx = rng.integers(1, 97, int(rng.integers(*context))).tolist()
        out = rng.integers(1, 97, int(rng.integers(2, 10))).tolist()
        t.record_call(ctx, out, (-4.6 + 0.4 * rng.standard_normal(len(out))).tolist(),
                      [0] * len(out))
      group.append(t)
    groups.append(group)
  return groups


@pytest.fixture(scope="module")
def packed():
  batch, info = build_batch(_model_groups(), STEP_CFG, learner_version=0)
  assert info["rows"] >= 3 and info["sequences"] >= 8
  return batch


def _rows(batch):
  return {k: np.asarray(getattr(batch, k)).reshape(-1, batch.shape[-1])
          for k in ("tokens", "positions", "segment_ids", "loss_mask", "behav_logp", "advantages",
                    "versions")}


def _layout(rows, m, learner_version=0):
  """The same rows as m micro-batches (empty rows added to divide evenly)."""
  pad = -len(rows["tokens"]) % m
  out = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]).reshape(
      m, -1, v.shape[1]) for k, v in rows.items()}
  return TrainBatch(**out, num_tokens=np.asarray(out["loss_mask"].sum(), np.int32),
                    learner_version=np.asarray(learner_version, np.int32))


def _with_empty(batch, k):
  """k more micro-batches of padding rows: the step must skip them."""
  def pad(x):
    return np.concatenate([x, np.zeros((k, *x.shape[1:]), x.dtype)])
  return TrainBatch(**{f: pad(np.asarray(getattr(batch, f))) for f in _rows(batch)},
                    num_tokens=batch.num_tokens, learner_version=batch.learner_version)


def _unpack(batch):
  """One sequence per row, padded: the layout without packing."""
  rows = _rows(batch)
  out = {k: [] for k in rows}
  for r in range(len(rows["tokens"])):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      sel = seg == s
      for k, v in rows.items():
        row = np.zeros_like(v[r])
        row[:sel.sum()] = v[r][sel]
        out[k].append(row)
  rows = {k: np.stack(v) for k, v in out.items()}
  rows["segment_ids"] = np.where(rows["segment_ids"] > 0, 1, 0).astype(np.int32)
  return _layout(rows, 1)


_STEPS = {}  # per mesh: the seed-0 model and one jitted step (tests share compilations)


def _model_and_step(mesh):
  if mesh not in _STEPS:
    with jax.set_mesh(mesh):
      model = create_model(MODEL, mesh, seed=0, dtype="float32")
      params, opt_state, step = make_ppo_step(model, optax.sgd(1.0), STEP_CFG)
      _STEPS[mesh] = (model, params, opt_state, step)
  return _STEPS[mesh]


def _run(batch, mesh):
  """(metrics, flat params after one SGD step of lr 1, i.e. params − grad) from seed-0 params."""
  _, params, opt_state, step = _model_and_step(mesh)
  params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))  # the step donates them
  with jax.set_mesh(mesh):
    params, _, metrics = step(params, opt_state, shard_batch(batch, mesh))
  return jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, flat_state(params))


def _assert_same(a, b, atol=1e-5):
  (ma, pa), (mb, pb) = a, b
  assert int(ma["num_tokens"]) == int(mb["num_tokens"]) > 0
  for k in ("loss", "grad_norm", "entropy", "behav_weight_mean", "capped_frac", "ratio_mean"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=atol, err_msg=k)
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=atol, err_msg=k)


def test_step_packed_equals_padded(packed):
  mesh = single_device_mesh()
  a, b = _run(packed, mesh), _run(_unpack(packed), mesh)
  used_rows = int((np.asarray(packed.segment_ids).max(-1) > 0).sum())
  assert _unpack(packed).shape[1] > used_rows  # really repacked
  assert 0 < a[0]["capped_frac"] < 1  # the cap acts in this batch
  _assert_same(a, b)


def test_step_micro_batch_split_equals_full_batch_gradient(packed):
  """Three micro-batches (and two of padding) accumulated by the step == the gradient of the
  loss the step is built from, over all rows in one micro-batch."""
  mesh = single_device_mesh()
  one, three = _layout(_rows(packed), 1), _with_empty(_layout(_rows(packed), 3), 2)
  assert one.shape[0] == 1 and three.shape[0] == 5
  model = _model_and_step(mesh)[0]
  with jax.set_mesh(mesh):
    params, loss_fn = make_ppo_loss(model, STEP_CFG)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, one)
    before = jax.tree.map(np.asarray, flat_state(params))
    grads = jax.tree.map(np.asarray, flat_state(grads))
  metrics, after = _run(three, mesh)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5, atol=1e-6)
  assert float(np.abs(loss)) > 1e-3
  for k in before:
    np.testing.assert_allclose(after[k], before[k] - grads[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_step_one_vs_eight_devices(packed):
  batch = _layout(_rows(packed), 1)
  rows = _rows(batch)
  batch = _layout({k: np.concatenate([v, np.zeros((16 - len(v), v.shape[1]), v.dtype)])
                   for k, v in rows.items()}, 2)  # [2, 8, 16]: 8 rows shard over 8 devices
  eight = make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices=jax.devices()[:8])
  sharded = shard_batch(batch, eight)
  assert sharded.tokens.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
  _assert_same(_run(batch, single_device_mesh()), _run(batch, eight))


def test_step_logprobs_are_the_engines_tempered_logprobs(packed):
  """With behaviour log-probs from the decode engine's sampler at the same temperature and
  the same params, w = 1 everywhere and L = −Σ m Â / N: both the temperature and the
  target alignment of the step match the engine's."""
  cfg = STEP_CFG.model_copy(update={"adv_batch_norm": False})  # build-time only: same step
  batch, _ = build_batch(_model_groups(), cfg, learner_version=0)
  assert batch.shape == packed.shape
  mesh = single_device_mesh()
  rows = _rows(batch)
  model = _model_and_step(mesh)[0]
  with jax.set_mesh(mesh):
    logits, _ = jax.jit(lambda m, *a: m(*a))(model, rows["tokens"], rows["positions"],
                                             rows["segment_ids"])
  flat = logits[:, :-1].reshape(-1, logits.shape[-1])
  n = len(flat)
  x = processed_logits(flat, jnp.full((n,), cfg.temperature), jnp.zeros((n,), jnp.int32),
                       jnp.ones((n,)))
  logp = jnp.take_along_axis(jax.nn.log_softmax(x), rows["tokens"][:, 1:].reshape(-1, 1), -1)
  rows["behav_logp"][:, 1:] = np.where(rows["loss_mask"][:, 1:],
                                       np.asarray(logp).reshape(rows["tokens"][:, 1:].shape), 0)
  metrics, _ = _run(_layout(rows, batch.shape[0]), mesh)
  np.testing.assert_allclose(metrics["behav_weight_mean"], 1.0, atol=1e-5)
  np.testing.assert_allclose(metrics["behav_weight_max"], 1.0, atol=1e-5)
  assert metrics["capped_frac"] == 0 and metrics["ratio_mean"] == pytest.approx(1.0)
  adv = rows["advantages"][rows["loss_mask"]]
  np.testing.assert_allclose(metrics["loss"], -adv.mean(), rtol=1e-4, atol=1e-6)
  assert adv.mean() != 0
  assert 0 < metrics["entropy"] < np.log(MODEL.vocab_size) + 1e-4
  # The train-inference gap: in float32 the engine and the learner agree to rounding (the same
  # sums in other orders: blockwise attention here, XLA's in the engine), a few dozen ulps of
  # the log-probs' magnitude.
  assert metrics["fresh_tokens"] == rows["loss_mask"][:, 1:].sum() > 0
  magnitude = max(1.0, float(np.max(np.abs(rows["behav_logp"]))))
  assert metrics["logp_gap_max"] <= 64 * np.finfo(np.float32).eps * magnitude

  # Only tokens the learner's own version sampled enter the gap: make every other loss token
  # one version stale with a large gap, and shift the fresh ones' by 0.25.
  mask = rows["loss_mask"].copy()
  mask[:, 0] = False
  fresh = mask & (np.cumsum(mask, axis=1) % 2 == 0)
  rows["versions"] = np.where(fresh, 1, 0).astype(np.int32)
  rows["behav_logp"] = np.where(fresh, rows["behav_logp"] - 0.25,
                                np.where(mask, rows["behav_logp"] - 3.0, 0.0)).astype(np.float32)
  metrics, _ = _run(_layout(rows, batch.shape[0], learner_version=1), mesh)
  assert metrics["fresh_tokens"] == fresh.sum() > 0
  np.testing.assert_allclose([metrics["logp_gap_mean"], metrics["logp_gap_max"]], 0.25,
                             atol=2e-5)


# -- PPO minibatches ------------------------------------------------------------------------

MB_CFG = STEP_CFG.model_copy(update={"ppo_n_minibatches": 2})


def test_build_batch_splits_sequences_into_balanced_minibatches():
  one, _ = build_batch(_model_groups(), STEP_CFG, learner_version=0)
  two, info = build_batch(_model_groups(), MB_CFG, learner_version=0)
  m = two.shape[0]
  assert m % 2 == 0 and info["minibatches"] == 2 and int(two.num_tokens) == int(one.num_tokens)
  first, second = _segments(two, slice(0, m // 2)), _segments(two, slice(m // 2, m))
  assert first and second and sorted(first + second) == sorted(_segments(one))  # each once
  longest = max(len(t) for t in first + second)
  assert abs(sum(len(t) for t in first) - sum(len(t) for t in second)) <= longest


def _flat(batch, micro_batches):
  """The rows of some micro-batches as one [rows, T] micro-batch dict."""
  return {k: jnp.asarray(np.asarray(getattr(batch, k))[micro_batches].reshape(-1, batch.shape[-1]))
          for k in ("tokens", "positions", "segment_ids", "loss_mask", "behav_logp", "advantages",
                    "versions")}


def test_step_minibatches_are_successive_updates_around_the_starting_policy():
  """n = 2: the step equals two SGD updates in turn, each on its half of the sequences divided by
  that half's loss-token count, both with π_prox the policy the step started from; from the
  second update on ρ ≠ 1, so the clip binds, where one minibatch has ρ ≡ 1."""
  from flax import nnx

  from asearcher_jax.rl.step import micro_batch_loss, tempered_token_logprobs
  mesh, lr = single_device_mesh(), 0.5
  batch, _ = build_batch(_model_groups(), MB_CFG, learner_version=0)
  half = batch.shape[0] // 2
  with jax.set_mesh(mesh):
    model = create_model(MODEL, mesh, seed=0, dtype="float32")
    graphdef, p0, rest = nnx.split(model, nnx.Param, ...)
    p0 = jax.tree.map(jnp.copy, p0)

    @jax.jit
    def reference_update(p, mb, prox):
      def loss(p):
        return micro_batch_loss(nnx.merge(graphdef, p, rest), {**mb, "prox_logp": prox},
                                jnp.sum(mb["loss_mask"]), 0, MB_CFG)[0]
      return jax.tree.map(lambda x, g: x - lr * g, p, jax.grad(loss)(p))

    expected = p0
    for part in (slice(0, half), slice(half, None)):
      mb = _flat(batch, part)
      prox = tempered_token_logprobs(nnx.merge(graphdef, p0, rest), mb["tokens"], mb["positions"],
                                     mb["segment_ids"], mb["loss_mask"], MB_CFG.temperature)[0]
      expected = reference_update(expected, mb, prox)
    expected = jax.tree.map(np.asarray, flat_state(expected))

    metrics = {}
    for cfg in (MB_CFG, STEP_CFG):
      params, opt_state, step = make_ppo_step(
          create_model(MODEL, mesh, seed=0, dtype="float32"), optax.sgd(lr), cfg)
      params, _, m = step(params, opt_state, shard_batch(batch, mesh))
      metrics[cfg.ppo_n_minibatches] = jax.tree.map(float, m)
      if cfg is MB_CFG:
        got = jax.tree.map(np.asarray, flat_state(params))
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert metrics[2]["approx_kl"] > 1e-4 and metrics[2]["clip_frac"] > 0
  assert metrics[1]["approx_kl"] == 0 and metrics[1]["clip_frac"] == 0


def test_a_non_finite_update_is_skipped_and_counted(packed):
  """Poison that reached the step (a row of NaN advantages) moves nothing: the update is
  skipped and counted, and the parameters stay bit for bit what they were."""
  mesh = single_device_mesh()
  rows = _rows(packed)
  poisoned = {k: v.copy() for k, v in rows.items()}
  poisoned["advantages"][np.nonzero(poisoned["loss_mask"].any(axis=1))[0][0]] = np.nan
  with jax.set_mesh(mesh):
    model = create_model(MODEL, mesh, seed=0, dtype="float32")
    before = jax.tree.map(np.asarray, flat_state(nnx.state(model, nnx.Param)))
    params, opt_state, step = make_ppo_step(model, optax.sgd(1.0, momentum=0.9), STEP_CFG)
    params, _, m = step(params, opt_state, shard_batch(_layout(poisoned, packed.shape[0]), mesh))
  after = jax.tree.map(np.asarray, flat_state(params))
  assert int(m["nonfinite_updates"]) == 1 and np.isfinite(float(m["loss"]))
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])


def test_step_skips_a_minibatch_without_loss_tokens(packed):
  """An empty minibatch makes no optimizer update (a zero gradient still moves the parameters
  through the optimizer's momentum): data then padding in two minibatches equals the data in
  one. SGD with momentum, not Adam: its update is linear in the gradient, so the two programs'
  float32 rounding stays at the gradient's rounding, where Adam's g / sqrt(v) turns the
  rounding of a near-zero gradient into a difference of up to its learning rate."""
  mesh = single_device_mesh()
  results = []
  for cfg, batch in ((STEP_CFG, packed), (MB_CFG, _with_empty(packed, packed.shape[0]))):
    with jax.set_mesh(mesh):
      params, opt_state, step = make_ppo_step(
          create_model(MODEL, mesh, seed=0, dtype="float32"), optax.sgd(1.0, momentum=0.9),
          cfg)
      params, _, m = step(params, opt_state, shard_batch(batch, mesh))
    results.append((jax.tree.map(np.asarray, m), jax.tree.map(np.asarray, flat_state(params))))
  _assert_same(*results)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="ppo_n_minibatches=2"):
    params, opt_state, step = make_ppo_step(
        create_model(MODEL, mesh, seed=0, dtype="float32"), optax.adam(1e-3), MB_CFG)
    step(params, opt_state, shard_batch(_layout(_rows(packed), 3), mesh))


def test_learner_head_on_loss_positions_alone_equals_the_whole_rows():
  """build_batch's `select` (the learner runs the LM head on the loss positions alone) lists
  every loss token's predecessor once, and gives the loss, gradient and statistics of the head
  on every position: with π_prox = π_θ (one minibatch), and with π_prox other weights (ρ ≠ 1,
  so the clip and the behaviour cap bind) as minibatches after the first have it."""
  from flax import nnx

  from asearcher_jax.rl.batch import head_widths
  from asearcher_jax.rl.step import micro_batch_loss, tempered_token_logprobs
  from asearcher_jax.train.lm import target_weight
  cfg = STEP_CFG.model_copy(update={"row_tokens": 64})  # contexts as long as the outputs, 4x
  batch, info = build_batch(_model_groups(context=(16, 40)), cfg, learner_version=0)
  t = batch.shape[-1]
  select = np.asarray(batch.select).reshape(-1, np.asarray(batch.select).shape[-1])
  weight = np.asarray(target_weight(*(jnp.asarray(_rows(batch)[k])
                                      for k in ("segment_ids", "loss_mask")))) > 0
  counts = weight.sum(axis=1)
  assert info["head_positions"] == select.shape[1] == -(-counts.max() // 16) * 16 < t
  assert select.shape[1] in head_widths(t) and head_widths(t) == [16, 32, 48, 64]
  assert head_widths(640) == [80, 160, 240, 320, 400, 480, 560, 640]
  for row, w, n in zip(select, weight, counts):
    np.testing.assert_array_equal(row[:n], np.flatnonzero(w))  # target t+1 of position t
    assert (row[n:] == t - 1).all()  # padding: the last position, which has no target
  assert weight.sum() == int(batch.num_tokens)

  # In float64 the model's sums, reordered, differ by ~1e-16 of their size, where a misread
  # target differs by its whole log-prob. The PPO loss and its statistics are float32 by design
  # (rl/loss.py) from the same per-token values: only their sums' order differs, by at most
  # n eps32 of the sum of the terms' sizes (n = loss tokens).
  n = int(batch.num_tokens)
  bound = n * float(np.finfo(np.float32).eps)
  adv = np.abs(np.asarray(batch.advantages)[np.asarray(batch.loss_mask)]).sum() / n

  def assert_same(a, b):
    (la, sa), ga = a
    (lb, sb), gb = b
    terms = adv * cfg.behav_weight_cap * max(float(sb["ratio_max"]), 1 + cfg.eps_clip)
    np.testing.assert_allclose(la, lb, rtol=0, atol=bound * terms)
    for k in sb:  # sums of non-negative terms (means, fractions) and maxima
      np.testing.assert_allclose(sa[k], sb[k], rtol=bound, atol=0, err_msg=k)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      assert x.dtype == np.float64
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-10 * float(np.max(np.abs(y))))

  whole = dataclasses.replace(batch, select=None)
  mesh = single_device_mesh()
  with jax.enable_x64(True), jax.set_mesh(mesh):
    model = create_model(MODEL, mesh, seed=0, dtype="float64", param_dtype="float64")
    params, loss_fn = make_ppo_loss(model, cfg)

    def finalized(p, b):
      loss, stats = loss_fn(p, b)
      return loss, finalize_stats(stats)

    grad = jax.jit(jax.value_and_grad(finalized, has_aux=True))
    one = grad(params, batch), grad(params, whole)
    assert_same(*one)
    assert float(one[0][0][1]["capped_frac"]) > 0  # the cap acts on π_θ's weights here

    graphdef, p0, rest = nnx.split(model, nnx.Param, ...)
    other = jax.tree.map(lambda x: 2.0 * x, p0)  # π_prox: other weights than the ones trained
    mb = _flat(batch, slice(None))

    @jax.jit
    def prox_loss(p, select):
      prox = tempered_token_logprobs(nnx.merge(graphdef, other, rest), mb["tokens"],
                                     mb["positions"], mb["segment_ids"], mb["loss_mask"],
                                     cfg.temperature, select)[0]
      loss = lambda p: micro_batch_loss(  # noqa: E731
          nnx.merge(graphdef, p, rest), {**mb, "select": select, "prox_logp": prox},
          batch.num_tokens, 0, cfg)
      (value, stats), g = jax.value_and_grad(loss, has_aux=True)(p)
      return (value, finalize_stats(stats)), g

    two = prox_loss(p0, jnp.asarray(select)), prox_loss(p0, None)
    assert_same(*two)
    assert 0 < float(two[1][0][1]["clip_frac"]) < 1
