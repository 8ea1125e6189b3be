"""The sampler on its own: inverse-CDF draws land exactly where the cumulative weights say, and
many draws follow the tempered, truncated distribution the log-probabilities report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from asearcher_jax.inference.sampling import inverse_cdf, processed_logits, sample


def test_inverse_cdf_is_exact_at_every_boundary():
  """Integer weights (exact in float32) across blocks, with zero weights at block edges: every
  integer target maps to the index numpy's searchsorted gives, never to a zero weight."""
  rng = np.random.default_rng(0)
  w = rng.integers(0, 4, 300).astype(np.float32)  # 300: three blocks, the last one partial
  w[[0, 127, 128, 255, 256, 299]] = 0
  w[5] = 3
  c = np.cumsum(w)
  targets = np.arange(int(c[-1]), dtype=np.float32)
  got = np.asarray(inverse_cdf(jnp.tile(jnp.asarray(w), (len(targets), 1)),
                               jnp.asarray(targets)))
  np.testing.assert_array_equal(got, np.searchsorted(c, targets, side="right"))
  assert (w[got] > 0).all()
  top = np.asarray(inverse_cdf(jnp.asarray(w)[None], jnp.asarray([c[-1]])))  # rounding's edge
  assert top[0] == np.flatnonzero(w)[-1]


def _reference_probs(logits, temperature, top_k, top_p):
  x = np.asarray(processed_logits(jnp.asarray(logits)[None], jnp.asarray([temperature]),
                                  jnp.asarray([top_k]), jnp.asarray([top_p])))[0]
  p = np.exp(x.astype(np.float64) - x.max())
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0),
                                                     (1.3, 0, 0.9), (0.5, 50, 0.8)])
def test_draws_follow_the_distribution_their_logprobs_report(temperature, top_k, top_p):
  """40,000 seeded draws over a 300-token vocabulary: frequencies pass a chi-square test against
  the processed distribution at p = 1e-6, no draw falls outside the truncation, and each draw's
  log-probability is that distribution's."""
  v, n = 300, 40_000
  logits = np.random.default_rng(1).normal(0, 2, v).astype(np.float32)
  probs = _reference_probs(logits, temperature, top_k, top_p)
  keys = jax.vmap(lambda i: jax.random.key_data(jax.random.key(i)))(jnp.arange(n))
  d = jax.jit(sample)(jnp.tile(jnp.asarray(logits), (n, 1)), keys.astype(jnp.uint32),
                      jnp.full((n,), temperature), jnp.full((n,), top_k, jnp.int32),
                      jnp.full((n,), top_p))
  tokens = np.asarray(d.tokens)
  assert (probs[tokens] > 0).all()
  np.testing.assert_allclose(np.asarray(d.logprobs), np.log(probs[tokens]), rtol=1e-5, atol=1e-5)
  expected = probs * n
  big = expected >= 5  # the chi-square approximation's rule; the rest pooled into one cell
  observed = np.bincount(tokens, minlength=v)
  obs = np.append(observed[big], observed[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
  assert chi2 < stats.chi2.ppf(1 - 1e-6, keep.sum() - 1), chi2


def test_greedy_rows_take_the_first_maximum_and_draw_nothing():
  x = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
  keys = jnp.asarray([[1, 2], [3, 4]], jnp.uint32)
  d = sample(x, keys, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32), jnp.ones((2,)))
  assert np.asarray(d.tokens).tolist() == [1, 0]
  np.testing.assert_allclose(np.asarray(d.logprobs),
                             np.asarray(jax.nn.log_softmax(x, axis=-1))[[0, 1], [1, 0]],
                             rtol=1e-6)
  again = sample(x, keys, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32), jnp.ones((2,)))
  np.testing.assert_array_equal(d.keys, again.keys)  # keys still advance, deterministically
  assert not np.array_equal(np.asarray(d.keys), np.asarray(keys))


def test_low_temperatures_report_exact_logprobs_and_tiny_ones_sample_greedily():
  """At T = 0.01 the tempered logits are large and close to their log-normaliser: each
  log-prob is computed from the max before the normaliser, within 1e-5 of float64's over the
  same tempered logits (their difference had kept only ~1e-4). A temperature below
  GREEDY_BELOW samples greedily: tempering by 1e-30 sank kept logits below truncation's
  NEG_INF and drew a token top-k had dropped."""
  from asearcher_jax.inference.sampling import GREEDY_BELOW
  rng = np.random.default_rng(3)
  n = 64
  logits = (20 + rng.normal(0, 0.02, (n, 50))).astype(np.float32)  # close, large logits
  keys = jax.vmap(lambda i: jax.random.key_data(jax.random.key(i)))(jnp.arange(n))
  d = sample(jnp.asarray(logits), keys.astype(jnp.uint32), jnp.full((n,), 0.01),
             jnp.zeros((n,), jnp.int32), jnp.ones((n,)), top_n=3)
  # The tempered logits as the sampler holds them (float32 at ~2000: ~1e-4 apart from the exact
  # quotient, and from numpy's), then their log-softmax in float64.
  x = np.asarray(processed_logits(jnp.asarray(logits), jnp.full((n,), 0.01),
                                  jnp.zeros((n,), jnp.int32), jnp.ones((n,)))).astype(np.float64)
  ref = x - x.max(-1, keepdims=True)
  ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
  tokens = np.asarray(d.tokens)
  np.testing.assert_allclose(np.asarray(d.logprobs), ref[np.arange(n), tokens], atol=1e-5)
  np.testing.assert_allclose(np.asarray(d.top_logprobs), -np.sort(-ref, -1)[:, :3], atol=1e-5)

  row = jnp.asarray([[-3.0, -2.0, -5.0, -2.5, -4.0, -3.0, -2.0]])
  for t in (1e-30, 1e-38, GREEDY_BELOW / 2):
    d = sample(row, keys[:1].astype(jnp.uint32), jnp.asarray([t]), jnp.asarray([2]),
               jnp.asarray([1.0]))
    assert int(d.tokens[0]) == 1  # the first maximum, as at temperature 0
    np.testing.assert_allclose(float(d.logprobs[0]),
                               float(jax.nn.log_softmax(row[0])[1]), rtol=1e-6)


def _kept_by_definition(logits, temperature, top_k, top_p):
  """The tokens top-k then top-p keep, in float64 from the definition: the top_k most likely
  (all if 0), then the smallest most-likely-first prefix of them whose probability (normalised
  over the top-k) reaches top_p; and the distance of that prefix's mass from top_p."""
  x = logits.astype(np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  k = len(x) if top_k == 0 else min(top_k, len(x))
  p = np.exp(x[order[:k]] - x[order[0]])
  p /= p.sum()
  before = np.cumsum(p) - p
  n = k if top_p >= 1 else int((before < top_p).sum())
  edge = before[max(n - 1, 0):n + 1]  # the last kept token's and the first dropped one's
  margin = np.inf if top_p >= 1 else float(np.abs(edge - top_p).min())
  return set(order[:n].tolist()), margin


@pytest.mark.parametrize("flat_row", [False, True])
def test_truncation_keeps_what_the_definition_keeps(flat_row):
  """Rows with top-k inside and beyond the first TRUNCATION_PREFIX tokens, top-p alone and with
  top-k, greedy and untruncated rows, in one batch; with `flat_row`, one row whose top-p set
  reaches past the prefix, so the batch takes the full sort."""
  from asearcher_jax.inference.sampling import TRUNCATION_PREFIX
  v = 2000
  rows = [(1.0, 5, 1.0), (0.7, TRUNCATION_PREFIX, 1.0), (1.0, TRUNCATION_PREFIX + 1, 1.0),
          (1.3, 0, 0.9), (0.5, 50, 0.8), (1.0, 0, 1.0), (0.0, 0, 0.5), (1.0, 400, 0.95)]
  rng = np.random.default_rng(11)
  logits = rng.normal(0, 3, (len(rows), v))
  if flat_row:
    rows.append((1.0, 0, 0.5))
    logits = np.concatenate([logits, rng.normal(0, 0.1, (1, v))])
  logits = logits.astype(np.float32)
  t, k, p = (np.asarray(c) for c in zip(*rows))
  out = np.asarray(jax.jit(processed_logits)(jnp.asarray(logits), jnp.asarray(t, jnp.float32),
                                             jnp.asarray(k, jnp.int32),
                                             jnp.asarray(p, jnp.float32)))
  for i, (temperature, top_k, top_p) in enumerate(rows):
    kept = set(np.flatnonzero(out[i] > -1e29).tolist())
    if temperature <= 0:  # greedy: the logits as they came
      np.testing.assert_array_equal(out[i], logits[i])
      continue
    want, margin = _kept_by_definition(logits[i], temperature, top_k, top_p)
    # float32 sums of n probabilities round by at most n units of 2^-24 (the exps and the
    # normaliser add about two more); a boundary nearer than that would test rounding
    assert margin > 2 * (len(want) + 2) * 2.0**-24, "boundary within rounding: change the seed"
    assert kept == want, (i, len(kept), len(want))
  if flat_row:
    assert len(kept) > TRUNCATION_PREFIX  # the row that needed the full sort
