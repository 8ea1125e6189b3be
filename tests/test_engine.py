"""The decode engine and its continuous-batching driver against the policy's full forward."""

import contextlib
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fail_prefills_of, single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.errors import CheckpointError
from asearcher_jax.inference import Driver, Engine, Request, SamplingParams
from asearcher_jax.inference.weights import load_weights
from asearcher_jax.models import create_model
from asearcher_jax.models.params import flat_state

MESH = single_device_mesh()
CFG = tiny_config("qwen3", vocab_size=128)
RNG = np.random.RandomState(0)


def make_model(seed=0):
  return create_model(CFG, MESH, seed=seed, dtype="float32")


@pytest.fixture(scope="module")
def model():
  return make_model()


@pytest.fixture(scope="module")
def forward_logits(model):
  fn = jax.jit(lambda m, t: m(t)[0])
  return lambda m, ids: np.asarray(fn(m, jnp.asarray([ids])))[0]


def reference_logprobs(logits, temperature, top_k, top_p):
  """numpy reference: temperature, then top-k, then top-p (HF/vLLM order), renormalised."""
  x = logits.astype(np.float64) / temperature
  order = np.argsort(-x)
  keep = np.zeros_like(x, bool)
  k = top_k or len(x)
  probs = np.exp(x[order[:k]] - x[order[0]])
  probs /= probs.sum()
  mass_before = np.cumsum(probs) - probs
  keep[order[:k][mass_before < top_p]] = True
  x = np.where(keep, x, -np.inf)
  return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def prompt(n):
  return RNG.randint(0, 128, n).tolist()


@pytest.fixture(scope="module")
def driver(model):
  engine = Engine(model, slots=4, max_len=64, mesh=MESH)
  with Driver(engine, version=1) as d:
    yield d


def greedy(forward_logits, model, prompt_ids, n):
  """The full forward's greedy continuation: the reference every decode path must equal."""
  seq = list(prompt_ids)
  for _ in range(n):
    seq.append(int(forward_logits(model, seq)[-1].argmax()))
  return seq[len(prompt_ids):]


def test_greedy_equals_argmax_of_full_forward(driver, model, forward_logits):
  p = prompt(9)
  r = driver.generate(p, SamplingParams(temperature=0.0, max_new_tokens=8))
  seq = list(p) + greedy(forward_logits, model, p, 8)
  assert r.output_ids == seq[len(p):]
  assert r.finish_reason == "length" and r.versions == [1] * 8
  full = forward_logits(model, seq[:-1])
  expected = jax.nn.log_softmax(full[len(p) - 1:], axis=-1)
  np.testing.assert_allclose(r.logprobs, [expected[i, t] for i, t in enumerate(r.output_ids)],
                             atol=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0),
                                                     (1.3, 5, 1.0), (0.9, 0, 0.8),
                                                     (1.0, 20, 0.5)])
def test_sampled_logprobs_equal_the_processed_full_forward(driver, model, forward_logits,
                                                           temperature, top_k, top_p):
  p = prompt(7)
  s = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=3, max_new_tokens=10)
  r = driver.generate(p, s)
  logits = forward_logits(model, p + r.output_ids[:-1])[len(p) - 1:]
  for i, tok in enumerate(r.output_ids):
    ref = reference_logprobs(logits[i], temperature, top_k, top_p)
    assert np.isfinite(ref[tok]), f"token {i} was outside the truncated distribution"
    np.testing.assert_allclose(r.logprobs[i], ref[tok], atol=1e-4)


def test_top_logprobs_are_the_most_likely_tokens_of_the_sampled_distribution(
    driver, model, forward_logits):
  """What OpenAI's logprobs=N / top_logprobs report; asking for them changes no token, and a
  neighbour that does not ask gets none."""
  p = prompt(7)
  s = SamplingParams(temperature=0.7, seed=5, max_new_tokens=6, top_logprobs=5)
  plain = SamplingParams(temperature=0.7, seed=5, max_new_tokens=6)
  asked, other = driver.submit(Request(p, s)), driver.submit(Request(prompt(5), plain))
  r = asked.wait(60)
  assert r.output_ids == driver.generate(p, plain).output_ids and other.wait(60).top_logprobs == []
  logits = forward_logits(model, p + r.output_ids[:-1])[len(p) - 1:]
  assert len(r.top_logprobs) == len(r.output_ids) == 6
  for i, top in enumerate(r.top_logprobs):
    ref = reference_logprobs(logits[i], 0.7, 0, 1.0)
    assert [t for t, _ in top] == np.argsort(-ref)[:5].tolist()
    np.testing.assert_allclose([lp for _, lp in top], np.sort(ref)[::-1][:5], atol=1e-4)
  # Under top_k = 3 the distribution has three tokens: only they are alternatives.
  cut = driver.generate(p, SamplingParams(temperature=0.7, seed=5, max_new_tokens=3, top_k=3,
                                          top_logprobs=5))
  logits = forward_logits(model, p + cut.output_ids[:-1])[len(p) - 1:]
  for i, top in enumerate(cut.top_logprobs):
    ref = reference_logprobs(logits[i], 0.7, 3, 1.0)
    assert [t for t, _ in top] == np.argsort(-ref)[:3].tolist()
    np.testing.assert_allclose([lp for _, lp in top], np.sort(ref)[::-1][:3], atol=1e-4)
  with pytest.raises(ValueError, match="top_logprobs"):
    driver.generate(p, SamplingParams(top_logprobs=21))


def test_seeded_results_do_not_depend_on_batch_company(driver):
  p = prompt(6)
  s = SamplingParams(temperature=1.0, seed=11, max_new_tokens=12)
  alone = driver.generate(p, s).output_ids
  others = [driver.submit(Request(prompt(5 + i), SamplingParams(temperature=1.0, seed=i,
                                                                max_new_tokens=20)))
            for i in range(3)]
  crowded = driver.submit(Request(p, s))
  assert crowded.wait(60).output_ids == alone
  for o in others:
    o.wait(60)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
  batch = [driver.submit(Request(q, greedy)) for q in (prompt(4), p, prompt(8))]
  assert batch[1].wait(60).output_ids == driver.generate(p, greedy).output_ids


def test_more_requests_than_slots_all_complete(driver):
  reqs = [driver.submit(Request(prompt(3 + i % 5), SamplingParams(temperature=1.0, seed=i,
                                                                  max_new_tokens=3 + i)))
          for i in range(10)]
  for i, r in enumerate(reqs):
    assert len(r.wait(120).output_ids) == 3 + i and r.finish_reason == "length"


def test_stop_tokens_and_max_len(model):
  engine = Engine(model, slots=2, max_len=24, mesh=MESH)
  with Driver(engine) as d:
    p = prompt(5)
    free = d.generate(p, SamplingParams(temperature=0.0, max_new_tokens=10)).output_ids
    stop = free[3]
    r = d.generate(p, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,)))
    assert r.output_ids == free[:free.index(stop) + 1] and r.finish_reason == "stop"
    long = d.generate(prompt(20), SamplingParams(temperature=0.0, max_new_tokens=20))
    assert long.finish_reason == "max_len" and 20 + len(long.output_ids) == 25


def test_multi_turn_session_reuses_kv_and_matches_full_prefill(driver, model):
  greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
  context = prompt(10)
  held = 0  # tokens the session's cache holds after a turn
  for turn in range(4):
    r = driver.generate(context, greedy, session_id="episode-1")
    fresh = driver.generate(context, greedy)  # no session: full prefill
    assert r.output_ids == fresh.output_ids
    np.testing.assert_allclose(r.logprobs, fresh.logprobs, atol=1e-4)
    assert r.cached_tokens == held and r.prefilled_tokens == len(context) - held
    held = len(context) + len(r.output_ids) - 1  # the last sampled token never entered the cache
    context = context + r.output_ids + prompt(3)  # tool output appended by the agent


def test_session_eviction_to_host_and_drop(model):
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
  with Driver(engine, device_sessions=1, host_sessions=1) as d:
    ctx = {name: prompt(8) for name in "abc"}
    outs = {name: d.generate(ctx[name], greedy, session_id=name) for name in "abc"}
    st = d.stats()
    assert (st.sessions_device, st.sessions_host) == (1, 1)  # a dropped, b on host, c on device
    for name in "cba":  # device hit, host hit, miss (order keeps b on host until it is used)
      nxt = ctx[name] + outs[name].output_ids + [1, 2]
      r = d.generate(nxt, greedy, session_id=name)
      assert r.output_ids == d.generate(nxt, greedy).output_ids
      assert (r.cached_tokens > 0) == (name != "a")


def test_ending_a_session_while_its_turn_runs_keeps_it_ended(model):
  """An episode that times out cancels its turn and ends its session at once. When the end
  reached the engine before the cancelled turn was dropped, the turn's release saved the
  session again: nobody would ever end it, and its pages stayed out of the pool."""
  engine = Engine(model, slots=2, max_len=64, mesh=MESH, page_size=4)
  with Driver(engine, device_sessions=4, host_sessions=4) as d:
    ended, asked = [], threading.Event()

    def on_tokens(r, ids):  # the engine thread, mid-step: the client's cancel and end arrive
      if len(r.output_ids) >= 3 and not asked.is_set():
        asked.set()
        d.cancel(r)
        t = threading.Thread(target=lambda: ended.append(d.end_session("s")))
        t.start()
        time.sleep(0.3)  # the end is queued while this step is still recorded
    r = d.submit(Request(prompt(10), SamplingParams(temperature=0.0, max_new_tokens=40),
                         session_id="s", on_tokens=on_tokens))
    r.wait(60)
    deadline = time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
      time.sleep(0.01)
    st = d.stats()
    assert r.finish_reason == "cancelled" and ended == [True]
    assert st.sessions_device == st.sessions_host == 0
    assert d._pool.free == d._pool.total  # every page back in the pool


def test_session_turns_admitted_together_continue_in_one_call(model, monkeypatch):
  """Three sessions' next turns, queued while the driver is paused, continue in one batched
  prefill into their pages (one call, not three) and decode what a fresh prefill of the same
  context decodes, greedy or sampled with the request's seed."""
  engine = Engine(model, slots=4, max_len=64, mesh=MESH)
  params = {"a": SamplingParams(temperature=0.0, max_new_tokens=4),
            "b": SamplingParams(temperature=1.0, seed=7, max_new_tokens=4),
            "c": SamplingParams(temperature=0.0, max_new_tokens=4)}
  calls = []
  with Driver(engine, device_sessions=4) as d:
    ctx = {name: prompt(6 + i) for i, name in enumerate("abc")}
    outs = {name: d.generate(ctx[name], params[name], session_id=name) for name in "abc"}
    into = engine.prefill_into_batch
    monkeypatch.setattr(engine, "prefill_into_batch",
                        lambda *a, **k: (calls.append(len(a[2])), into(*a, **k))[1])
    nxt = {name: ctx[name] + outs[name].output_ids + prompt(2 + i)
           for i, name in enumerate("abc")}
    d.pause()
    reqs = {name: d.submit(Request(nxt[name], params[name], session_id=name)) for name in "abc"}
    d.resume()
    done = {name: r.wait(60) for name, r in reqs.items()}
    assert calls == [3]
    for name in "abc":
      assert done[name].cached_tokens > 0
      ref = d.generate(nxt[name], params[name])
      assert done[name].output_ids == ref.output_ids
      np.testing.assert_allclose(done[name].logprobs, ref.logprobs, atol=1e-5)


def test_bursts_are_prefilled_in_calls_of_at_most_prefill_tokens(model, monkeypatch):
  """Six fresh prompts queued at once, then six sessions' next turns, with prefill_tokens 32
  (two rows of one 16-token bucket): every batched prefill computes at most 32 padded tokens,
  in three calls of two rows each; with 8, below one row's bucket, each request runs alone;
  and every request decodes what it decodes unbounded (one call of six, padded to 8 x 16 =
  128 tokens)."""
  greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
  fresh_prompts = [prompt(10 + i) for i in range(6)]
  tails = [prompt(3 + i % 3) for i in range(6)]
  results = {}
  for bound in (32, 8, None):
    engine = Engine(model, slots=8, max_len=64, mesh=MESH)
    calls = {"fresh": [], "continuing": []}
    batch, into = engine.prefill_batch, engine.prefill_into_batch

    def record(kind, token_lists):
      calls[kind].append(engine.prefill_size(len(token_lists), max(map(len, token_lists))))

    monkeypatch.setattr(engine, "prefill_batch",
                        lambda *a, **k: (record("fresh", a[1]), batch(*a, **k))[1])
    monkeypatch.setattr(engine, "prefill_into_batch",
                        lambda *a, **k: (record("continuing", a[3]), into(*a, **k))[1])
    with Driver(engine, device_sessions=8, prefill_tokens=bound) as d:
      d.pause()
      reqs = [d.submit(Request(p, greedy, session_id=f"s{i}"))
              for i, p in enumerate(fresh_prompts)]
      d.resume()
      first = [r.wait(60) for r in reqs]
      d.pause()
      nxt = [p + r.output_ids + t for p, r, t in zip(fresh_prompts, first, tails)]
      reqs = [d.submit(Request(c, greedy, session_id=f"s{i}")) for i, c in enumerate(nxt)]
      d.resume()
      second = [r.wait(60) for r in reqs]
    assert all(r.cached_tokens > 0 for r in second)
    results[bound] = ([r.output_ids for r in first], [r.output_ids for r in second],
                      [r.logprobs for r in first + second])
    expect = {32: [32] * 3, 8: [16] * 6, None: [128]}[bound]
    assert calls == {"fresh": expect, "continuing": expect}
  for bound in (32, 8):
    assert results[bound][:2] == results[None][:2]
    for a, b in zip(results[bound][2], results[None][2]):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_interruption_switches_version_at_the_boundary(model, forward_logits, decode_steps):
  new_model = make_model(seed=1)
  engine = Engine(model, slots=2, max_len=128, mesh=MESH, decode_steps=decode_steps)
  with Driver(engine, version=3, update_mode="abort") as d:
    p = prompt(6)

    def on_tokens(r, ids):  # runs on the engine thread: freeze generation after 4 tokens
      if len(r.output_ids) == 4 and r.interruptions == 0:
        d.pause()

    r = d.submit(Request(p, SamplingParams(temperature=0.8, seed=5, max_new_tokens=12),
                         on_tokens=on_tokens))
    while not (len(r.output_ids) >= 4 and d.stats().paused):
      time.sleep(0.01)
    new_params = load_weights(engine.params, nnx.state(new_model, nnx.Param), CFG)
    assert d.update_weights(4, new_params)["interrupted"] == 1
    d.resume()
    r.wait(60)
  # Steps already dispatched when the pause lands (the rest of the block, and the block in
  # flight) still belong to version 3; every later token to version 4.
  boundary = r.versions.count(3)
  assert 4 <= boundary <= 4 + 2 * decode_steps - 1
  assert r.versions == [3] * boundary + [4] * (12 - boundary)
  assert r.interruptions == 1
  old = forward_logits(model, p + r.output_ids[:boundary - 1])[len(p) - 1:]
  new = forward_logits(new_model, p + r.output_ids[:-1])[len(p) - 1:]
  for i, tok in enumerate(r.output_ids):
    ref = reference_logprobs((old if i < boundary else new)[i], 0.8, 0, 1.0)
    np.testing.assert_allclose(r.logprobs[i], ref[tok], atol=1e-4, err_msg=f"token {i}")


def test_keep_kv_update_tags_new_version_and_refuses_bad_weights(model):
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)
  with Driver(engine, version=0, update_mode="keep_kv") as d:
    good = flat_state(engine.params)
    bad = dict(good)
    bad["layers/wqkv"] = jnp.zeros((1, 2, 3))
    with pytest.raises(CheckpointError, match=r"layers/wqkv has shape \[1, 2, 3\]"):
      load_weights(engine.params, bad, CFG)
    d.update_weights(1, load_weights(engine.params, good, CFG))
    with pytest.raises(ValueError, match="not newer than the serving version 1"):
      d.update_weights(1, engine.params)
    r = d.generate(prompt(4), SamplingParams(temperature=0.0, max_new_tokens=3))
    assert r.versions == [1, 1, 1]


@pytest.mark.parametrize("prompt_ids,sampling,message", [
    ([], SamplingParams(), "the prompt is empty"),
    (list(range(70)), SamplingParams(), "the prompt has 70 tokens; the maximum is 63"),
    ([5, 500], SamplingParams(), r"token ids out of the vocabulary \[0, 128\): \[500\]"),
    ([5], SamplingParams(max_new_tokens=0), r"max_new_tokens must be in \[1, 64\]"),
    ([5], SamplingParams(max_new_tokens=10**9), r"max_new_tokens must be in \[1, 64\]"),
    ([5], SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([5], SamplingParams(temperature=-1.0), r"temperature must be in \[0, 100\]"),
    ([5], SamplingParams(stop=("</search>",)), "stop strings need a server with a tokenizer"),
])
def test_bad_requests_are_refused_and_the_driver_keeps_serving(driver, prompt_ids, sampling,
                                                               message):
  with pytest.raises(ValueError, match=message):
    driver.submit(Request(prompt_ids, sampling))
  assert driver.generate([1, 2, 3], SamplingParams(max_new_tokens=2)).finish_reason == "length"


def test_cancel_frees_the_slot(model):
  engine = Engine(model, slots=1, max_len=256, mesh=MESH)
  with Driver(engine) as d:
    long = d.submit(Request(prompt(4), SamplingParams(max_new_tokens=200, seed=0)))
    d.cancel(long)
    assert long.wait(60).finish_reason == "cancelled"
    assert d.generate(prompt(4), SamplingParams(max_new_tokens=2)).finish_reason == "length"


@pytest.mark.parametrize("shape", [{"data": 1, "fsdp": 2, "tensor": 4},
                                   {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_engine_matches_single_device(shape):
  from asearcher_jax.sharding import make_mesh
  cfg = tiny_config("qwen2", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8)
  mesh = make_mesh(shape)
  sampling = SamplingParams(temperature=0.9, seed=2, max_new_tokens=6)
  prompts = [prompt(5 + i) for i in range(4)]
  outs = []
  for m in (MESH, mesh):
    engine = Engine(create_model(cfg, m, seed=4, dtype="float32"), slots=4, max_len=32, mesh=m)
    with Driver(engine) as d:
      reqs = [d.submit(Request(p, sampling)) for p in prompts]
      outs.append([r.wait(120) for r in reqs])
    if m is mesh:
      # The page pool is split over kv heads; every slot draws on all of its pages.
      spec = engine._programs.pool_sharding.spec
      assert spec[1] == "tensor" and spec[2] is None
  for single, sharded in zip(*outs):
    assert single.output_ids == sharded.output_ids
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-4)


# -- failure handling: one bad request never takes others (or the driver) down ------------------


def test_a_raising_callback_does_not_stop_the_driver(model):
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)

  def explode(r, *args):
    raise RuntimeError("client went away")

  with Driver(engine) as d:
    bad = d.submit(Request(prompt(4), SamplingParams(max_new_tokens=5), on_tokens=explode,
                           on_finish=explode))
    good = d.submit(Request(prompt(4), SamplingParams(max_new_tokens=5)))
    assert bad.wait(60).finish_reason == "length" and good.wait(60).finish_reason == "length"
    assert d.live and d.generate(prompt(3), SamplingParams(max_new_tokens=1)).output_ids


def test_one_failing_row_of_a_batched_prefill_fails_alone(model, monkeypatch):
  engine = Engine(model, slots=4, max_len=64, mesh=MESH)
  fail_prefills_of(engine, monkeypatch)
  with Driver(engine) as d:
    d.pause()  # queue everything first so that the rows share one batched prefill
    reqs = [d.submit(Request([127, 1, 2] if i == 1 else prompt(4), SamplingParams(
        max_new_tokens=3))) for i in range(3)]
    d.resume()
    reasons = [r.wait(60).finish_reason for r in reqs]
  assert reasons == ["length", "error", "length"] and "device fault" in reqs[1].error


def test_stop_finishes_every_request_even_one_mid_prefill_past_its_timeout(model, monkeypatch):
  """stop() cancels what is left; a prefill that outlasts its join (a long compile) has its
  request cancelled by the engine thread as it leaves, never left hanging. A stopped driver
  takes no request and does not start again (its pages' bookkeeping went with its requests)."""
  engine = Engine(model, slots=2, max_len=48, mesh=MESH)
  d = Driver(engine).start()
  d.generate(prompt(3), SamplingParams(temperature=0.0, max_new_tokens=2))  # compiled
  real, entered = engine.prefill_batch, threading.Event()

  def slow(*args, **kwargs):
    entered.set()
    time.sleep(1.5)
    return real(*args, **kwargs)

  monkeypatch.setattr(engine, "prefill_batch", slow)
  r = d.submit(Request(prompt(4), SamplingParams(temperature=0.0, max_new_tokens=8)))
  queued = d.submit(Request(prompt(5), SamplingParams(temperature=0.0, max_new_tokens=8)))
  assert entered.wait(30)
  d.stop(timeout=0.1)
  assert r.wait(30).finish_reason == "cancelled" and queued.wait(30).finish_reason == "cancelled"
  with pytest.raises(RuntimeError, match="not running"):
    d.submit(Request(prompt(3), SamplingParams(max_new_tokens=1)))
  with pytest.raises(RuntimeError, match="runs once"):
    d.start()


def test_a_submit_that_races_stop_is_refused_not_lost(model):
  """stop() landing between submit's first check and its enqueue: the request is refused
  (RuntimeError) rather than queued on a driver nobody serves."""
  d = Driver(Engine(model, slots=2, max_len=48, mesh=MESH)).start()

  class StopsTheDriver:  # request ids are drawn between the two: stop from another thread there
    def __next__(self):
      t = threading.Thread(target=d.stop)
      t.start()
      t.join()
      return 99

  d._ids = StopsTheDriver()
  with pytest.raises(RuntimeError, match="not running"):
    d.submit(Request(prompt(3), SamplingParams(temperature=0.0, max_new_tokens=2)))
  assert not d._pending


def test_a_failed_session_save_still_finishes_the_request(model, monkeypatch):
  """A session that cannot be copied to host memory is dropped; its request still finishes
  and its pages go back to the pool."""
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)
  monkeypatch.setattr(engine, "read_pages", lambda *a: (_ for _ in ()).throw(MemoryError("oom")))
  with Driver(engine, device_sessions=0) as d:
    r = d.generate(prompt(5), SamplingParams(max_new_tokens=3), session_id="s", timeout=60)
    assert r.finish_reason == "length" and d.stats().sessions_device == 0
    assert d.stats().sessions_host == 0 and d._pool.free == engine.num_pages


def test_seeds_use_all_64_bits_and_out_of_range_seeds_are_refused(driver):
  s = lambda seed: SamplingParams(temperature=1.0, seed=seed, max_new_tokens=8)
  p = prompt(5)
  low = driver.generate(p, s(5)).output_ids
  assert driver.generate(p, s(5)).output_ids == low
  assert driver.generate(p, s(5 + 2**32)).output_ids != low
  assert len(driver.generate(p, s(2**64 - 1)).output_ids) == 8
  with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
    driver.submit(Request(p, s(2**64)))
  with pytest.raises(ValueError, match="top_k must be at most the vocabulary size 128"):
    driver.submit(Request(p, SamplingParams(top_k=2**40)))


def test_a_context_that_fills_the_cache_can_be_prefilled(model, forward_logits):
  """What an interrupted request at max_len re-prefills: exactly max_len tokens, then one sample."""
  engine = Engine(model, slots=1, max_len=16, mesh=MESH)
  ids = prompt(16)
  prefix = engine.prefill(engine.params, np.asarray(ids, np.int32))
  expected = forward_logits(model, ids)[-1]
  assert int(prefix.length[0]) == 16 and int(prefix.token[0]) == int(expected.argmax())
  with pytest.raises(ValueError, match="17 tokens do not fit max_len 16"):
    engine.prefill(engine.params, np.asarray(prompt(17), np.int32))


def test_driver_refuses_weights_of_the_wrong_shape(model):
  engine = Engine(model, slots=1, max_len=32, mesh=MESH)
  bad = jax.tree.map(lambda x: x[..., :1] if x.ndim > 1 else x, engine.params)
  with Driver(engine, version=0) as d:
    with pytest.raises(ValueError, match=r"weights: \[.embed.\]\.value is float32\[128, 1\], "
                       r"the served model has float32\[128, 64\]"):
      d.update_weights(1, bad)
    assert d.stats().version == 0 and d.generate(prompt(3), SamplingParams(
        max_new_tokens=2)).versions == [0, 0]


def test_stats_are_safe_to_read_while_sessions_churn(model):
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)
  errors = []
  with Driver(engine, device_sessions=1, host_sessions=1) as d:
    stop = threading.Event()

    def reader():
      while not stop.is_set():
        try:
          d.stats()
        except Exception as e:  # noqa: BLE001 - any exception is the failure under test
          errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(12):
      d.generate(prompt(4), SamplingParams(max_new_tokens=2), session_id=f"s{i}")
    stop.set()
    t.join()
  assert not errors


def test_rows_without_truncation_are_untouched_by_a_truncating_neighbour():
  from asearcher_jax.inference.sampling import processed_logits
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 151936)) * 3
  out = processed_logits(logits, jnp.array([1.0, 1.0]), jnp.array([0, 5]), jnp.array([1.0, 1.0]))
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(logits[0]))
  assert int(jnp.sum(out[1] > -1e29)) == 5


ENGINE_PROGRAMS = ("prefill_fresh", "prefill_into", "insert", "set_pages", "generate",
                   "generate_block", "read_pages", "write_pages", "init_state")


@contextlib.contextmanager
def compiled_programs():
  """The names of the engine programs XLA compiles inside the block, on any thread."""
  compiled = []

  class Catch(logging.Handler):
    def emit(self, record):
      m = record.getMessage()
      compiled.extend(n for n in ENGINE_PROGRAMS if m.startswith(f"Compiling jit({n})"))

  handler = Catch()
  logging.getLogger("jax").addHandler(handler)
  jax.config.update("jax_log_compiles", True)  # global: the driver compiles on its own thread
  try:
    yield compiled
  finally:
    jax.config.update("jax_log_compiles", False)
    logging.getLogger("jax").removeHandler(handler)


def test_engines_of_one_configuration_share_their_compiled_programs(forward_logits):
  """A second engine of the same configuration compiles nothing, and serves its own weights."""
  a, b = make_model(seed=11), make_model(seed=12)
  p = np.asarray(prompt(5), np.int32)

  def first_tokens(engine):
    prefix = engine.prefill(engine.params, p)
    state = engine.insert(prefix, engine.init_decode_state(), 0)
    _, result = engine.generate(engine.params, state)
    return int(prefix.token[0]), int(result.tokens[0])

  with compiled_programs() as compiled:  # max_len 40: no other test's configuration
    first_a = first_tokens(Engine(a, slots=2, max_len=40, mesh=MESH))
  assert {"prefill_fresh", "insert", "generate", "init_state"} <= set(compiled)
  with compiled_programs() as compiled:
    first_b = first_tokens(Engine(b, slots=2, max_len=40, mesh=MESH))
    first_a_again = first_tokens(Engine(a, slots=2, max_len=40, mesh=MESH))
  assert compiled == []
  assert first_a_again == first_a
  assert first_b == tuple(greedy(forward_logits, b, p, 2))
  with compiled_programs() as compiled:  # another shape compiles its own
    first_tokens(Engine(a, slots=2, max_len=48, mesh=MESH))
  assert "generate" in compiled


@pytest.mark.parametrize("decode_steps,chunk,bound,top", [
    (1, None, None, False), (4, None, None, False), (1, 32, 32, False), (4, 32, 32, True)])
def test_warmup_compiles_everything_serving_meets(model, decode_steps, chunk, bound, top):
  """Every shape a driver meets is compiled by warmup; with the driver's prefill_chunk and
  prefill_tokens, warmup skips the prefills it never runs (buckets past the chunk's, several
  rows past the bound): here 1 or 2 rows of 16 tokens and 1 row of 32, not 1/2/4 x 16/32/64."""
  # A pool of 9 pages of 16 tokens: three slots cannot all reach max_len 64 at once.
  engine = Engine(model, slots=3, max_len=64, mesh=MESH, min_prefill_bucket=16,
                  decode_steps=decode_steps, num_pages=9)
  blocks = 3 if decode_steps > 1 else 0  # a block program per window
  prefills = 3 * 3 if chunk is None else 2 + 1  # rows x buckets
  # page-table rewrites + prefills x (fresh, sessions) + windows + blocks + host offload and
  # back; with `top`, the prefills, windows and blocks again for requests asking top_logprobs
  variants = 2 if top else 1
  assert engine.warmup(chunk, bound, top) == 3 + variants * (prefills * 2 + 3 + blocks) + 2
  with compiled_programs() as compiled:
    with Driver(engine, device_sessions=1, host_sessions=1, prefill_chunk=chunk,
                prefill_tokens=bound) as d:
      reqs = [d.submit(Request(prompt(n), SamplingParams(max_new_tokens=m, seed=n,
                                                         top_logprobs=2 * top * (n % 3 == 0)),
                               session_id=f"s{n % 2}"))
              for n, m in ((3, 40), (20, 5), (40, 20), (9, 2), (50, 13))]
      for r in reqs:
        r.wait(120)
      d.generate(reqs[0].prompt + reqs[0].output_ids + [1, 2], SamplingParams(max_new_tokens=3),
                 session_id="s1")
  assert compiled == []


def _filled_state(engine, prompts):
  keys = [np.asarray([7, i], np.uint32) for i in range(len(prompts))]
  prefix = engine.prefill_batch(engine.params, prompts, [0.0, 1.0, 0.7], [0, 0, 5],
                                [1.0, 1.0, 0.9], keys)
  return engine.insert(prefix, engine.init_decode_state(), list(range(len(prompts))))


def test_a_block_of_steps_is_the_steps_one_by_one(model):
  """generate_block(steps=n) is n generate calls in one dispatch: the same tokens (greedy,
  sampled, truncated), log-probs, positions, PRNG keys and cache."""
  engine = Engine(model, slots=3, max_len=48, mesh=MESH)
  prompts = [prompt(5), prompt(9), prompt(3)]
  stepped, singles = _filled_state(engine, prompts), []
  for _ in range(6):
    stepped, r = engine.generate(engine.params, stepped, None)
    singles.append(r)
  blocked, block = engine.generate_block(engine.params, _filled_state(engine, prompts), None, 6)
  assert block.tokens.shape == (6, 3)
  np.testing.assert_array_equal(np.stack([r.tokens for r in singles]), block.tokens)
  # float32 log-softmax over 128 logits: a few ulps of difference between two compilations
  np.testing.assert_allclose(np.stack([r.logprobs for r in singles]), block.logprobs,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stepped.positions, blocked.positions)
  np.testing.assert_array_equal(stepped.keys, blocked.keys)
  np.testing.assert_allclose(stepped.cache.k, blocked.cache.k, rtol=1e-5, atol=1e-5)


def test_block_decoding_serves_what_step_decoding_serves(model):
  """A driver that decodes 4 steps per dispatch answers exactly as one that decodes 1: stops,
  length limits, the cache's end, seeded sampling, top log-probs and per-token versions, with
  more requests than slots (so blocks and single steps alternate as requests wait)."""
  specs = [(prompt(5), SamplingParams(temperature=0.0, max_new_tokens=9)),
           (prompt(4), SamplingParams(temperature=1.0, seed=3, max_new_tokens=7)),
           (prompt(6), SamplingParams(temperature=0.8, top_k=5, seed=4, max_new_tokens=2)),
           (prompt(30), SamplingParams(temperature=0.0, max_new_tokens=20)),  # hits max_len
           (prompt(3), SamplingParams(temperature=1.0, seed=5, max_new_tokens=11,
                                      top_logprobs=3)),
           (prompt(7), SamplingParams(temperature=1.0, top_p=0.8, seed=6, max_new_tokens=13))]
  free = None
  runs = {}
  for steps in (1, 4):
    with Driver(Engine(model, slots=3, max_len=36, mesh=MESH, decode_steps=steps),
                version=2) as d:
      if free is None:  # a stop id the greedy answer reaches mid-block
        free = d.generate(specs[0][0], specs[0][1]).output_ids
        specs.append((specs[0][0], SamplingParams(temperature=0.0, max_new_tokens=9,
                                                  stop_token_ids=(free[5],))))
      reqs = [d.submit(Request(p, s)) for p, s in specs]
      runs[steps] = [r.wait(120) for r in reqs]
  for a, b in zip(runs[1], runs[4]):
    assert (a.output_ids, a.finish_reason, a.versions) == (b.output_ids, b.finish_reason,
                                                           b.versions)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    assert [[t for t, _ in row] for row in a.top_logprobs] == \
        [[t for t, _ in row] for row in b.top_logprobs]
  assert runs[4][3].finish_reason == "max_len" and runs[4][-1].finish_reason == "stop"
  assert runs[4][-1].output_ids == free[:free.index(free[5]) + 1]


def test_the_next_block_is_dispatched_before_a_prefills_first_token_is_read(model, monkeypatch,
                                                                          forward_logits):
  """Admission never makes the host wait for a prefill: its first token is read (and
  recorded) only once the next decode block is on its way, and the answer is unchanged."""
  events = []
  engine = Engine(model, slots=2, max_len=64, mesh=MESH)
  real_generate, real_emit = engine.generate, Driver._emit

  def generate(*args, **kw):
    events.append("dispatch")
    return real_generate(*args, **kw)

  def emit(self, slot, r, token, *args, **kw):
    events.append(f"emit {len(r.output_ids)}")
    return real_emit(self, slot, r, token, *args, **kw)

  monkeypatch.setattr(engine, "generate", generate)
  monkeypatch.setattr(Driver, "_emit", emit)
  p = prompt(7)
  with Driver(engine) as d:
    r = d.generate(p, SamplingParams(temperature=0.0, max_new_tokens=3))
  assert events[:2] == ["dispatch", "emit 0"]
  assert r.output_ids == greedy(forward_logits, model, p, 3) and r.first_token_at is not None


def test_waiting_requests_get_single_steps():
  """Blocks only in steady decode: while a request waits for a slot, the next dispatch is one
  step, so a slot that frees is refilled at once."""
  engine = Engine(make_model(), slots=1, max_len=32, mesh=MESH, decode_steps=8)
  d = Driver(engine)
  assert d._block_steps() == 8
  d._pending.append(Request(prompt(3), SamplingParams()))
  assert d._block_steps() == 1


def test_block_size_defaults_by_platform():
  from asearcher_jax.inference.config import ServeSection
  assert ServeSection().steps_per_dispatch("cpu") == 1
  assert ServeSection().steps_per_dispatch("gpu") == ServeSection().steps_per_dispatch("tpu") == 8
  assert ServeSection(decode_steps=4).steps_per_dispatch("cpu") == 4
