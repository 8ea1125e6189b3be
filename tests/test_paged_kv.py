"""The paged KV cache: page-table writes and reads, the Pallas kernel against the XLA path, a
driver whose pool is too small for its slots (requests wait or are preempted, none is lost),
sessions that keep their pages, and chunked prefill."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config

from asearcher_jax.config import load_config
from asearcher_jax.errors import ConfigError
from asearcher_jax.inference import Driver, Engine, Request, SamplingParams
from asearcher_jax.models import create_model, paged_kv
from asearcher_jax.sharding import make_mesh

MESH = single_device_mesh()
CFG = tiny_config("qwen3", vocab_size=128)


@pytest.fixture(scope="module")
def model():
  return create_model(CFG, MESH, seed=0, dtype="float32")


def test_page_table_writes_read_back_as_a_contiguous_cache():
  """Tokens written through shuffled page tables, in two calls, gather back in position order;
  positions past a row's table go to the sink and nothing else changes."""
  rng = np.random.default_rng(0)
  layers, kv, pages, size, d = 2, 2, 12, 4, 3
  pool = jnp.zeros((layers, kv, pages + 1, size, d))
  table = jnp.asarray([[5, 2, 9], [11, 1, 0]], jnp.int32)  # row 1 holds 2 pages, then the sink
  x = rng.normal(size=(2, 10, kv, d)).astype(np.float32)
  positions = np.broadcast_to(np.arange(10), (2, 10))
  for part in (slice(0, 7), slice(7, 10)):
    pool = paged_kv.write(pool, 1, table, jnp.asarray(positions[:, part]), jnp.asarray(x[:, part]))
  got = np.asarray(paged_kv.gather(pool, 1, table, 10))
  np.testing.assert_array_equal(got[0], x[0])
  np.testing.assert_array_equal(got[1, :8], x[1, :8])  # two pages of 4
  touched = {5, 2, 9, 11, 1, 0}
  untouched = [p for p in range(pages + 1) if p not in touched]
  assert not np.asarray(pool)[:, :, untouched].any() and not np.asarray(pool)[0].any()


@pytest.mark.parametrize("kernel,devices", [("pallas_interpret", 1),
                                            ("pallas_interpret", 2),
                                            ("pallas_tpu_interpret", 2)])
def test_pallas_paged_kernel_agrees_with_the_xla_path(model, kernel, devices):
  """The Pallas kernels (interpret mode on CPU) decode what the XLA gather path decodes, with
  slots at different lengths in a shared, shuffled pool; on a tensor-parallel mesh of two
  devices, each running the kernel on its own kv head (the pool's split)."""
  prompts = [[3, 9, 27], list(range(1, 20)), [7] * 9]
  runs = []
  mesh = MESH if devices == 1 else make_mesh({"data": 1, "fsdp": 1, "tensor": devices},
                                             devices=jax.devices()[:devices])
  sharded = create_model(CFG, mesh, seed=0, dtype="float32")
  for name, served, where in (("xla", model, MESH), (kernel, sharded, mesh)):
    engine = Engine(served, slots=3, max_len=32, mesh=where, page_size=4, num_pages=20,
                    paged_kernel=name)
    keys = [np.asarray([1, i], np.uint32) for i in range(3)]
    prefix = engine.prefill_batch(engine.params, prompts, [0.0] * 3, [0] * 3, [1.0] * 3, keys)
    pages = [[17, 3], [1, 19, 4, 12, 8, 6], [2, 15, 9]]  # room for 6 more tokens each
    state = engine.insert(prefix, engine.init_decode_state(), [0, 1, 2], pages)
    tokens, logprobs = [], []
    for _ in range(5):
      state, r = engine.generate(engine.params, state, 32)
      tokens.append(np.asarray(r.tokens))
      logprobs.append(np.asarray(r.logprobs))
    runs.append((np.stack(tokens), np.stack(logprobs)))
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  if kernel == "pallas_interpret":  # float32 both ways
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)
  else:  # the TPU kernel's interpret mode runs its dots in bf16 passes: one bf16 ulp of scale
    scale = float(np.max(np.abs(runs[0][1])))
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=0,
                               atol=float(jnp.finfo(jnp.bfloat16).eps) * scale)
  if devices > 1:  # each device runs the kernel on its own kv head and that head's queries
    q = jnp.zeros((3, 1, CFG.num_heads, CFG.head_dim))
    pool = jnp.zeros((CFG.num_layers, CFG.num_kv_heads, 21, 4, CFG.head_dim))
    jaxpr = jax.make_jaxpr(lambda q, k, v, t, n: paged_kv.decode_attention(
        q, k, v, 0, t, n, 32, kernel, mesh))(q, pool, pool, jnp.ones((3, 8), jnp.int32),
                                             jnp.ones(3, jnp.int32))
    inner = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert inner and inner[0].params["jaxpr"].invars[0].aval.shape == (
        3, CFG.num_heads // devices, CFG.head_dim)


def test_pallas_tpu_paged_kernel_is_as_exact_as_the_xla_path_in_bf16():
  """The TPU kernel (interpret mode, which runs its dots as a TPU does: bf16 passes) over a
  shuffled bf16 pool, slots of different lengths: its outputs are as close to float64 on the
  same inputs as the XLA path's, within a few bf16 ulps; an idle slot's output is finite."""
  from asearcher_jax.models import paged_kv
  b, kv, group, d, size, pages, per_row = 5, 2, 4, 128, 16, 48, 8
  rng = np.random.default_rng(0)
  pool = [jnp.asarray(rng.normal(size=(1, kv, pages + 1, size, d)), jnp.bfloat16)
          for _ in range(2)]
  table = rng.permutation(np.arange(1, pages + 1))[:b * per_row].reshape(b, per_row)
  table[4] = paged_kv.SINK  # an idle slot
  lengths = np.array([5, 128, 17, 64, 0], np.int32)
  q = jnp.asarray(rng.normal(size=(b, 1, kv * group, d)), jnp.bfloat16)
  outs = {kernel: np.asarray(jax.jit(
      lambda q, k, v, t, n, kernel=kernel: paged_kv.decode_attention(
          q, k, v, 0, t, n, per_row * size, kernel))(q, *pool, jnp.asarray(table),
                                                     jnp.asarray(lengths)), np.float64)
      for kernel in ("xla", "pallas_tpu_interpret")}
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, *pool))
  exact = np.zeros((b - 1, kv * group, d))
  for i in range(b - 1):
    for h in range(kv * group):
      keys = kn[0, h // group][table[i]].reshape(-1, d)[:lengths[i]]
      logits = keys @ qn[i, 0, h] / np.sqrt(d)
      p = np.exp(logits - logits.max())
      exact[i, h] = p / p.sum() @ vn[0, h // group][table[i]].reshape(-1, d)[:lengths[i]]
  err = {k: np.max(np.abs(o[:b - 1, 0] - exact)) for k, o in outs.items()}
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  assert err["pallas_tpu_interpret"] <= max(4 * err["xla"], 2 * eps * np.max(np.abs(exact)))
  assert np.isfinite(outs["pallas_tpu_interpret"][b - 1]).all()


def _serve(model, kv_pages, specs, steps, prefill_chunk=None):
  engine = Engine(model, slots=4, max_len=48, mesh=MESH, page_size=4, num_pages=kv_pages,
                  decode_steps=steps)
  with Driver(engine, version=3, prefill_chunk=prefill_chunk) as d:
    reqs = [d.submit(Request(list(p), s, session_id=sid)) for p, s, sid in specs]
    done = [r.wait(120) for r in reqs]
    # a session's second turn, after the pool churned
    turn = [d.submit(Request(done[i].prompt + done[i].output_ids + [5, 6], SamplingParams(
        temperature=0.0, max_new_tokens=6), session_id=specs[i][2])).wait(120)
            for i, (_, _, sid) in enumerate(specs) if sid]
    # Every slot is idle now: none may still point at pages (an idle slot's steps write
    # through its row, into pages that other slots are handed next).
    assert (np.asarray(d._call(lambda: d._state.pages)) == paged_kv.SINK).all()
    for _, _, sid in specs:  # the sessions' pages go back with them
      if sid:
        d.end_session(sid)
    return done + turn, d._counters, d._pool.free


def _specs():
  rng = np.random.RandomState(1)
  specs = []
  for i in range(8):
    p = rng.randint(0, 128, 3 + 5 * i % 17).tolist()
    session = f"s{i}" if i in (2, 5) else None
    s = SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, top_k=5 if i == 3 else 0,
                       max_new_tokens=12 if session else 40 - 3 * i)  # some reach max_len
    specs.append((p, s, session))
  return specs


def _assert_same(runs, reference):
  for a, b in zip(runs, reference):
    assert (a.output_ids, a.finish_reason, a.versions) == (b.output_ids, b.finish_reason,
                                                           b.versions)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def full_pool_answers(model):
  return _serve(model, None, _specs(), 1)[0]


@pytest.mark.parametrize("steps", [1, 4])
def test_a_pool_too_small_for_its_slots_preempts_and_loses_nothing(model, steps,
                                                                    full_pool_answers):
  """Four slots share 14 pages of 4 tokens, where their answers need up to 12 pages each:
  requests wait for pages and the newest is preempted as the others grow. Every request
  still finishes with exactly the tokens, log-probs, versions and finish reasons that a pool
  with a full cache for every slot gives, sessions included, and all pages come back."""
  small, counters, free = _serve(model, 14, _specs(), steps)
  assert counters["preempted"] > 0 and free == 14
  _assert_same(small, full_pool_answers)
  assert any(r.interruptions for r in small) and small[-1].cached_tokens > 0


def test_chunked_prefill_answers_as_one_piece(model, full_pool_answers):
  """Prompts and session turns longer than the chunk are prefilled 5 tokens at a time, between
  decode steps: the same answers as prefilling each in one piece."""
  chunked, counters, free = _serve(model, None, _specs(), 1, prefill_chunk=5)
  assert counters["prefill_chunks"] > 0 and counters["preempted"] == 0
  _assert_same(chunked, full_pool_answers)
  assert chunked[-1].cached_tokens > 0


def test_a_long_prefill_does_not_stall_the_slots_that_decode(model, monkeypatch):
  """While a 40-token prompt is prefilled in 10 chunks of 4, a request already decoding keeps
  producing tokens between them (in one piece, none would come between the long request's
  submission and its first token). Cancelling a request mid-prefill frees its slot and pages."""
  engine = Engine(model, slots=2, max_len=64, mesh=MESH, page_size=4)
  seen = []
  with Driver(engine, prefill_chunk=4) as d:
    short = d.submit(Request([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=30),
                             on_tokens=lambda r, ids: seen.append("short")))
    while not short.output_ids:
      time.sleep(0.001)
    submitted = len(seen)
    long = d.submit(Request(list(range(1, 41)), SamplingParams(temperature=0.0, max_new_tokens=2),
                            on_tokens=lambda r, ids: seen.append("long")))
    long.wait(60)
    short.wait(60)
    # a decode step after each chunk but the last; the newest is recorded a loop later
    assert seen[submitted:seen.index("long")].count("short") >= 40 // 4 - 2
    reference = Driver(Engine(model, slots=2, max_len=64, mesh=MESH), prefill_chunk=None)
    with reference:
      assert reference.generate(long.prompt, long.sampling).output_ids == long.output_ids
    # Chunks of 100 ms each: the cancel lands while the 60-token prompt is still prefilling.
    into = engine.prefill_into
    monkeypatch.setattr(engine, "prefill_into", lambda *a, **k: (time.sleep(0.1), into(*a, **k))[1])
    doomed = d.submit(Request(list(range(1, 61)), SamplingParams(max_new_tokens=2)))
    while not d._prefilling:
      time.sleep(0.001)
    d.cancel(doomed)
    assert doomed.wait(60).finish_reason == "cancelled" and not doomed.output_ids
    assert d._call(lambda: (len(d._prefilling), d._pool.free)) == (0, engine.num_pages)


def test_an_error_while_admitting_loses_no_request(model):
  """A device error while admission moves a session out of the pool (here: the first
  eviction fails) leaves the requests that pass had already taken off the queue to be served
  afterwards, as if nothing had happened, rather than lost."""
  engine = Engine(model, slots=2, max_len=48, mesh=MESH, page_size=4, num_pages=12)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
  prompts = [list(range(1, 9)), list(range(3, 19))]
  with Driver(engine, device_sessions=2) as d:
    reference = [d.generate(p, greedy).output_ids for p in prompts]
    d.generate(list(range(5, 25)), greedy, session_id="s")  # holds 6 of the 12 pages
    evict, failed = d._sessions.evict, []

    def fail_once(*a, **k):
      if not failed:
        failed.append(True)
        raise RuntimeError("device error while moving a session out")
      return evict(*a, **k)

    d._sessions.evict = fail_once
    d.pause()
    reqs = [d.submit(Request(p, greedy)) for p in prompts]  # the second needs the session's
    d.resume()
    assert [r.wait(30).output_ids for r in reqs] == reference and failed
    assert all(r.finish_reason == "length" for r in reqs)


def test_pools_and_pages_that_cannot_work_are_refused(model):
  with pytest.raises(ConfigError, match="cannot hold one sequence of max_len 64"):
    load_config(None, ["serve.max_len=64", "serve.page_size=16", "serve.kv_pages=3"])
  with pytest.raises(ConfigError, match="pallas needs serve.page_size a power of two >= 16"):
    load_config(None, ["serve.paged_attention=pallas", "serve.page_size=24"])
  from asearcher_jax.models.paged_kv import platform_kernel
  with pytest.raises(ValueError, match="pallas is a GPU or TPU kernel; this process runs on cpu"):
    platform_kernel("pallas", "cpu")
  assert [platform_kernel("pallas", p) for p in ("gpu", "tpu")] == ["pallas_gpu", "pallas_tpu"]
  with pytest.raises(ValueError, match="cannot hold one sequence"):
    Engine(model, slots=2, max_len=64, mesh=MESH, page_size=16, num_pages=3)
  engine = Engine(model, slots=2, max_len=64, mesh=MESH, page_size=16, num_pages=5)
  prefix = engine.prefill(engine.params, np.arange(1, 30, dtype=np.int32))
  with pytest.raises(ValueError, match="needs pages"):
    engine.insert(prefix, engine.init_decode_state(), 0)
  with pytest.raises(ValueError, match="cannot hold the prefix's 29 tokens"):
    engine.insert(prefix, engine.init_decode_state(), 0, [[1]])
  jax.block_until_ready(engine.insert(prefix, engine.init_decode_state(), 0, [[4, 2]]))


def test_a_session_keeps_its_pages_until_a_request_needs_them(model):
  """A finished turn's pages stay with its session; when a new request needs them, the session
  moves to host memory (no request is preempted for it), and its next turn continues from
  there with what a full prefill gives."""
  engine = Engine(model, slots=2, max_len=64, mesh=MESH, page_size=8, num_pages=8)
  greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
  rng = np.random.RandomState(3)
  with Driver(engine, device_sessions=4, host_sessions=4) as d:
    first = rng.randint(0, 128, 30).tolist()
    a = d.generate(first, greedy, session_id="a")
    assert (d.stats().sessions_device, d._pool.free) == (1, 8 - 5)  # 37 tokens: 5 pages
    d.generate(rng.randint(0, 128, 50).tolist(), greedy)  # 58 tokens: all 8 pages
    assert (d.stats().sessions_device, d.stats().sessions_host) == (0, 1)
    assert d._counters["preempted"] == 0
    nxt = first + a.output_ids + [1, 2, 3]
    r = d.generate(nxt, greedy, session_id="a")
    assert r.cached_tokens == len(first) + len(a.output_ids) - 1
    assert d.stats().sessions_device == 1  # back in the pool after its turn
    full = d.generate(nxt, greedy)  # needs every page: the session leaves for the host again
    assert r.output_ids == full.output_ids
    np.testing.assert_allclose(r.logprobs, full.logprobs, rtol=1e-5, atol=1e-5)
    assert d.end_session("a") and d._pool.free == 8
