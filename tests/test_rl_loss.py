"""The decoupled PPO objective and the group advantages, on hand-made arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asearcher_jax.rl.advantages import batch_normalize, group_advantages
from asearcher_jax.rl.loss import combine_stats, decoupled_ppo_loss, finalize_stats

EPS = 0.2


def _random(seed, shape=(3, 11)):
  rng = np.random.default_rng(seed)
  logp = jnp.asarray(rng.normal(-2.0, 1.0, shape), jnp.float32)
  prox = logp + jnp.asarray(rng.normal(0.0, 0.4, shape), jnp.float32)  # ratios well past 1±ε
  adv = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
  mask = jnp.asarray(rng.random(shape) < 0.7)
  return logp, prox, adv, mask


def _standard_ppo(logp, old_logp, adv, mask, n):
  """Textbook clipped PPO around π_old, token-mean over n."""
  r = jnp.exp(logp - old_logp)
  pg = jnp.maximum(-adv * r, -adv * jnp.clip(r, 1 - EPS, 1 + EPS))
  return jnp.sum(jnp.where(mask, pg, 0.0)) / n


def test_equals_standard_ppo_when_behaviour_is_proximal():
  logp, prox, adv, mask = _random(0)
  n = float(mask.sum())

  def ours(lp):
    return decoupled_ppo_loss(lp, prox, prox, adv, mask, eps_clip=EPS, behav_weight_cap=5.0,
                              num_tokens=n)

  (loss, stats), grad = jax.value_and_grad(ours, has_aux=True)(logp)
  ref, ref_grad = jax.value_and_grad(_standard_ppo)(logp, prox, adv, mask, n)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
  s = finalize_stats(stats)
  assert s["behav_weight_mean"] == pytest.approx(1.0) and s["capped_frac"] == 0.0
  assert 0.0 < s["clip_frac"] < 1.0  # the clip really acted on some tokens
  assert float(s["approx_kl"]) > 0.0


def test_one_minibatch_gradient_is_importance_weighted_policy_gradient():
  logp, _, adv, mask = _random(1)
  behav = logp + jnp.asarray(np.random.default_rng(2).normal(0.0, 0.3, logp.shape), jnp.float32)
  n = float(mask.sum()) + 5.0  # the global N: more tokens live in other micro-batches

  def ours(lp):  # π_prox = sg π_θ of the same forward pass
    return decoupled_ppo_loss(lp, lp, behav, adv, mask, eps_clip=EPS, behav_weight_cap=None,
                              num_tokens=n)[0]

  def reference(lp):  # −Σ m·w·Â·logπθ / N, w a constant
    w = jax.lax.stop_gradient(jnp.exp(lp - behav))
    return -jnp.sum(jnp.where(mask, w * adv * lp, 0.0)) / n

  np.testing.assert_allclose(jax.grad(ours)(logp), jax.grad(reference)(logp), rtol=1e-5,
                             atol=1e-7)
  # and in value ρ ≡ 1: L = −Σ m·w·Â / N
  w = jnp.exp(logp - behav)
  np.testing.assert_allclose(ours(logp), -jnp.sum(jnp.where(mask, w * adv, 0.0)) / n, rtol=1e-5)


def test_capped_tokens_leave_the_loss_but_not_the_count():
  logp, prox, adv, mask = _random(3)
  # behaviour log-probs far below prox on every third token: w = e^3 ≈ 20 > cap 5
  far = jnp.zeros(logp.shape, bool).at[:, ::3].set(True)
  behav = jnp.where(far, prox - 3.0, prox - 0.1)
  n = float(mask.sum())
  kw = dict(eps_clip=EPS, num_tokens=n)
  loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, behav_weight_cap=5.0, **kw)
  capped = far & mask
  assert int(stats["capped"]) == int(capped.sum()) > 0
  # the remaining tokens, uncapped, divided by the ORIGINAL N
  kept, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask & ~capped, behav_weight_cap=None, **kw)
  np.testing.assert_allclose(loss, kept, rtol=1e-6)
  w = np.exp(0.1)  # the kept tokens' weight, by construction
  by_hand = w * np.sum(np.where(mask & ~capped, _per_token(logp, prox, adv), 0.0)) / n
  np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
  renormalised = by_hand * n / float((mask & ~capped).sum())
  assert not np.isclose(float(loss), renormalised)
  assert float(finalize_stats(stats)["capped_frac"]) == pytest.approx(capped.sum() / mask.sum())


def _per_token(logp, prox, adv):
  r = np.exp(np.asarray(logp) - np.asarray(prox))
  a = np.asarray(adv)
  return np.maximum(-a * r, -a * np.clip(r, 1 - EPS, 1 + EPS))


@pytest.mark.parametrize("bad", [-jnp.inf, -1e30])
def test_no_nan_with_infinite_or_huge_negative_logprobs(bad):
  logp, prox, adv, mask = _random(4, (2, 8))
  mask = mask.at[:, :4].set(True).at[:, 4:].set(False)
  # bad values at masked (4:) and unmasked (:4) positions, in θ, prox and behaviour
  logp = logp.at[0, 1].set(bad).at[0, 5].set(bad).at[1, 2].set(bad)
  prox = prox.at[0, 1].set(bad).at[0, 6].set(bad).at[1, 3].set(bad)
  behav = prox.at[1, 0].set(bad).at[1, 7].set(bad).at[0, 2].set(bad)
  for cap in (5.0, None):
    for pr in (prox, logp):  # a separate π_prox, and π_prox = sg π_θ
      def f(lp, pr=pr, cap=cap):
        return decoupled_ppo_loss(lp, pr, behav, adv, mask, eps_clip=EPS, behav_weight_cap=cap,
                                  num_tokens=8.0)

      (loss, stats), grad = jax.value_and_grad(f, has_aux=True)(logp)
      assert np.isfinite(loss), (bad, cap)
      assert np.isfinite(grad).all(), (bad, cap)
      assert (grad[:, 4:] == 0).all()  # masked tokens: exactly no gradient
      for v in finalize_stats(stats).values():
        assert np.isfinite(v)


def test_stats_combine_across_micro_batches_and_finalise_empty():
  logp, prox, adv, mask = _random(5, (4, 9))
  behav = prox - 0.5
  kw = dict(eps_clip=EPS, behav_weight_cap=1.5, num_tokens=float(mask.sum()))
  whole_loss, whole = decoupled_ppo_loss(logp, prox, behav, adv, mask, **kw)
  parts = [decoupled_ppo_loss(logp[i:i + 2], prox[i:i + 2], behav[i:i + 2], adv[i:i + 2],
                              mask[i:i + 2], **kw) for i in (0, 2)]
  np.testing.assert_allclose(sum(p[0] for p in parts), whole_loss, rtol=1e-6)
  combined = combine_stats([p[1] for p in parts])
  for k in whole:
    np.testing.assert_allclose(combined[k], whole[k], rtol=1e-6, err_msg=k)
  _, empty = decoupled_ppo_loss(logp, prox, behav, adv, jnp.zeros_like(mask), **kw)
  for k, v in finalize_stats(empty).items():
    assert v == 0.0, k


# -- advantages -----------------------------------------------------------------------------


def test_group_advantages_hand_worked():
  # [1, 0, 0, 1]: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]
  np.testing.assert_allclose(group_advantages([1, 0, 0, 1]), [0.5, -0.5, -0.5, 0.5])
  # [1, 0, 0, 0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25];
  # unbiased var = (0.75² + 3·0.25²) / 3 = (0.5625 + 0.1875) / 3 = 0.25, std 0.5
  # -> with std scaling [1.5, -0.5, -0.5, -0.5] (÷ (0.5 + 1e-5))
  np.testing.assert_allclose(group_advantages([1, 0, 0, 0], std_norm=True),
                             np.array([1.5, -0.5, -0.5, -0.5]) * 0.5 / (0.5 + 1e-5), rtol=1e-6)
  # F1 rewards [0.2, 0.8, 0.5]: mean 0.5 -> [-0.3, 0.3, 0]; var = (0.09+0.09+0)/2 = 0.09, std 0.3
  np.testing.assert_allclose(group_advantages([0.2, 0.8, 0.5]), [-0.3, 0.3, 0.0], atol=1e-7)
  np.testing.assert_allclose(group_advantages([0.2, 0.8, 0.5], std_norm=True, eps=0.0),
                             [-1.0, 1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("std_norm", [False, True])
def test_all_equal_group_gives_exact_zeros(std_norm):
  # mean([0.1]*3) = 0.10000000000000002 in float64: naive centring leaves 1e-17, which a
  # std of 0 (+eps) would blow up to 1e-12; the group must give exact zeros
  for rewards in ([0.1, 0.1, 0.1], [1.0] * 8, [0.0, 0.0], [0.7]):
    adv = group_advantages(rewards, std_norm=std_norm)
    assert adv.dtype == np.float32 and (adv == 0).all(), rewards
  assert group_advantages([], std_norm).shape == (0,)
  with pytest.raises(ValueError, match="non-finite"):
    group_advantages([1.0, float("nan")])


def test_batch_normalize_over_loss_tokens_only():
  # loss tokens 2, 4, 6 (100 is off the mask): mean 4, unbiased std sqrt((4+0+4)/2) = 2
  out = batch_normalize([2.0, 4.0, 100.0, 6.0], [1, 1, 0, 1], eps=0.0)
  np.testing.assert_allclose(out, [-1.0, 0.0, 0.0, 1.0], atol=1e-7)
  # token-level: a trajectory with 3 loss tokens weighs 3 times one with 1 token
  out = batch_normalize([1.0, 1.0, 1.0, -1.0], [1, 1, 1, 1], eps=0.0)
  # mean 0.5; deviations .5,.5,.5,-1.5; var = (3·.25 + 2.25)/3 = 1 -> [.5, .5, .5, -1.5]
  np.testing.assert_allclose(out, [0.5, 0.5, 0.5, -1.5], atol=1e-6)
  for adv, mask in (([0.3, 0.3, 9.0], [1, 1, 0]), ([1.0, 2.0], [0, 0]), ([], [])):
    out = batch_normalize(adv, mask)
    assert (out == 0).all() and np.isfinite(out).all()
