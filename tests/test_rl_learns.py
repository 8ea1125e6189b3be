"""The learner learns: trajectory records sampled from the policy, through `build_batch` and the
PPO step, raise the policy's expected reward on a small contextual task. The layout tests
(test_rl_batch.py) prove the step computes a loss exactly; this one proves the sign, the
alignment of rewards, advantages and behaviour log-probs with the tokens, and the optimizer
wiring add up to learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.agent.trajectory import Trajectory
from asearcher_jax.models import create_model
from asearcher_jax.rl import RLSection, build_batch, shard_batch
from asearcher_jax.rl.step import make_ppo_step

pytestmark = pytest.mark.e2e

V, N_OUT, PROMPTS = 8, 3, 8  # vocabulary, tokens per answer, distinct prompts
BOS = 1


def _target(p: int, i: int) -> int:
  return (p + i + 1) % V  # answer token i to prompt p; reward = share of right tokens


def test_ppo_learner_raises_expected_reward_on_a_contextual_task():
  mesh = single_device_mesh()
  cfg = RLSection(row_tokens=32, micro_batch_rows=8, group_size=8)
  with jax.set_mesh(mesh):
    model = create_model(tiny_config(vocab_size=V), mesh, seed=0, dtype="float32")
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    params, opt_state, step = make_ppo_step(model, optax.adam(3e-3), cfg)

  prompts = np.arange(PROMPTS)

  @jax.jit
  def next_logp(params, tokens):  # [B, t] -> log p(next token) [B, V]
    m = nnx.merge(graphdef, params, rest)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return jax.nn.log_softmax(m(tokens, positions, jnp.ones_like(tokens))[0][:, -1])

  def expected_reward(params) -> float:
    """Exact E[reward] over prompts: the mean probability of each right token given the
    right tokens before it (the reward is linear in the tokens)."""
    with jax.set_mesh(mesh):
      tokens = np.stack([[BOS, p] for p in prompts])
      total = 0.0
      for i in range(N_OUT):
        logp = np.asarray(next_logp(params, jnp.asarray(tokens)))
        right = np.array([_target(p, i) for p in prompts])
        total += np.exp(logp[np.arange(PROMPTS), right]).mean()
        tokens = np.concatenate([tokens, right[:, None]], axis=1)
    return total / N_OUT

  rng = np.random.default_rng(0)
  before = expected_reward(params)
  for version in range(30):
    ps = np.repeat(prompts, cfg.group_size)  # one group per prompt
    tokens = np.stack([[BOS, p] for p in ps])
    logps = []
    with jax.set_mesh(mesh):
      for _ in range(N_OUT):
        logp = np.asarray(next_logp(params, jnp.asarray(tokens)))
        sampled = np.array([rng.choice(V, p=np.exp(row) / np.exp(row).sum()) for row in logp])
        logps.append(logp[np.arange(len(ps)), sampled])
        tokens = np.concatenate([tokens, sampled[:, None]], axis=1)
    groups = []
    for g, p in enumerate(prompts):
      group = []
      for s in range(cfg.group_size):
        row = g * cfg.group_size + s
        out = tokens[row, 2:].tolist()
        t = Trajectory(qid=f"q{p}", question="q", answers=["a"], sample=s,
                       reward=float(np.mean([o == _target(p, i) for i, o in enumerate(out)])))
        t.record_call([BOS, int(p)], out, [float(lp[row]) for lp in logps], [version] * N_OUT)
        group.append(t)
      groups.append(group)
    batch, _ = build_batch(groups, cfg, learner_version=version)
    with jax.set_mesh(mesh):
      params, opt_state, _ = step(params, opt_state, shard_batch(batch, mesh))
  after = expected_reward(params)
  assert before < 0.2  # chance is 1/8
  assert after > before + 0.25, (before, after)
