#!/usr/bin/env python
"""Asynchronous against synchronous RL: trained tokens per second at η = 4 and η = 0.

  python benchmarks/async_vs_sync.py [--steps 12] [--etas 0 4] [--config configs/debug.yaml]
                                     [key=value ...]

The real pipeline in one process, as `asearcher train` wires it but colocated: the learner
(decoupled PPO, `Learner`), a decode driver on the same device fed by `DriverPublisher`, a
`LocalReplay` queue and one `RolloutWorker` running the ASearcher agent in a background thread.
A random tiny model cannot use tools, so a `WorkloadPolicy` drives the control flow on a
long-tail workload: each episode draws its turn count K from 1 + Pareto(α) (capped) and each
turn its length from a lognormal; every turn really decodes that many tokens on the engine
(the ids, behaviour log-probs and versions are the engine's, so the record and the training
are real), only the text the agent parses is replaced by `<search> .. </search>` on turns < K
and `<answer> yes|no </answer>` on turn K (so rewards vary within a group). The search tool
sleeps a lognormal latency. Everything is drawn from the episode's id and the seed, so both
runs see the same workload.

For each η, a fresh setup (model seed 0, empty queue): every shape the engine and the learner
step can meet is compiled first (`Engine.warmup()` and one step per micro-batch count on copied
weights; the second setup's engine reuses the first's programs), then the worker
and the learner start together and the clock runs from the learner's start to the publication
of its S-th step. Trained tokens (the loss tokens of the S steps) over that time is the
throughput (also without the first --ramp-steps steps, closer to the steady state); also the
staleness distribution (learner version − token version over loss tokens) and the learner's
wait per step. The CPU time other processes took during each timing is recorded: on a shared
2-core machine it skews the comparison. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from asearcher_jax.agent import Agent, AgentSection, Completion, Trajectory  # noqa: E402
from asearcher_jax.agent.context import observation  # noqa: E402
from asearcher_jax.agent.episode import derive_seed  # noqa: E402
from asearcher_jax.agent.policy import ContextTooLong, PolicyUnavailable  # noqa: E402
from asearcher_jax.config import load_config  # noqa: E402
from asearcher_jax.data.qa import QAItem  # noqa: E402
from asearcher_jax.inference import (  # noqa: E402
                                     Driver,
                                     Engine,
                                     QueueFullError,
                                     Request,
                                     SamplingParams,
)
from asearcher_jax.jsonl import read_lines  # noqa: E402
from asearcher_jax.models import build_tokenizer, create_model  # noqa: E402
from asearcher_jax.models.tokenizer import QWEN_SPECIAL_TOKENS  # noqa: E402
from asearcher_jax.replay.local import LocalReplay  # noqa: E402
from asearcher_jax.replay.queue import ReplayQueue  # noqa: E402
from asearcher_jax.reward import Scorer  # noqa: E402
from asearcher_jax.rl.batch import (  # noqa: E402
  TrainBatch,
  head_widths,
  shard_batch,
  staleness_limit,
)
from asearcher_jax.rl.learner import Learner  # noqa: E402
from asearcher_jax.rl.publish import DriverPublisher  # noqa: E402
from asearcher_jax.rl.rollout import PromptStream, RolloutWorker  # noqa: E402
from asearcher_jax.sharding import make_mesh  # noqa: E402
from asearcher_jax.tools.config import SearchClientSection  # noqa: E402
from asearcher_jax.tools.types import SearchHit, ToolResult  # noqa: E402
from benchmarks.common import run_info, write_result  # noqa: E402

GOAL = 2.0  # tokens/s at the largest η over tokens/s at η = 0
HIT = SearchHit("d1", "a", "b")  # what every search returns
PROMPT = "Q: ${question}\nA: <think>\n"


# -- the workload ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
  """Heavy-tailed episode shapes and tool latencies, a pure function of (seed, episode id)."""

  seed: int = 0
  turn_alpha: float = 1.1  # K = 1 + floor(Lomax(α)), capped at max_turns
  max_turns: int = 24
  tokens_median: float = 12.0  # new tokens per turn: lognormal, clipped to [1, tokens_cap]
  tokens_sigma: float = 0.8
  tokens_cap: int = 32
  latency_median_s: float = 0.25  # per search call: lognormal, clipped to latency_cap_s
  latency_sigma: float = 1.0
  latency_cap_s: float = 5.0

  def episode(self, key: str) -> tuple[list[int], str]:
    """Tokens to decode in each of the K turns, and the final answer."""
    rng = np.random.default_rng(derive_seed(self.seed, "episode", key))
    k = min(self.max_turns, 1 + int(rng.pareto(self.turn_alpha)))
    n = rng.lognormal(math.log(self.tokens_median), self.tokens_sigma, k)
    tokens = np.clip(np.rint(n), 1, self.tokens_cap).astype(int).tolist()
    return tokens, "yes" if rng.random() < 0.5 else "no"

  def latency(self, key: str) -> float:
    rng = np.random.default_rng(derive_seed(self.seed, "latency", key))
    return float(min(self.latency_cap_s, rng.lognormal(math.log(self.latency_median_s),
                                                       self.latency_sigma)))

  def expected_turns(self) -> float:
    # P(K >= k) = P(Lomax >= k - 1) = k^-α for k <= max_turns
    return float(sum(k ** -self.turn_alpha for k in range(1, self.max_turns + 1)))


class EnginePolicy:
  """The `Policy` protocol on an in-process decode driver: what `DecodePolicy` does over gRPC
  (exact ids, behaviour log-probs, versions), awaited through the request's finish callback so
  the event loop never blocks on the engine."""

  chat = False

  def __init__(self, driver: Driver, tokenizer):
    self.driver, self.tokenizer = driver, tokenizer

  async def complete(self, prompt, sampling, session_id=None) -> Completion:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_finish(r):
      try:
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(r))
      except RuntimeError:  # the loop closed (shutdown): nobody waits for this request
        pass

    try:
      req = self.driver.submit(Request(list(prompt.ids), sampling, session_id=session_id,
                                       on_finish=on_finish))
    except ValueError as e:
      if "maximum is" in str(e) or "max_len" in str(e):
        raise ContextTooLong(str(e)) from None
      raise PolicyUnavailable(str(e)) from None
    except (RuntimeError, QueueFullError) as e:  # the driver stopped, or is full
      raise PolicyUnavailable(str(e)) from None
    try:
      r = await done
    except asyncio.CancelledError:
      self.driver.cancel(req)
      raise
    if r.finish_reason in ("error", "cancelled") and not r.output_ids:
      raise PolicyUnavailable(f"request {r.finish_reason}: {r.error}")
    return Completion(self.tokenizer.decode(r.output_ids), list(r.output_ids),
                      list(r.logprobs), list(r.versions), r.finish_reason, False,
                      len(prompt.ids))

  async def end_session(self, session_id: str) -> None:
    await asyncio.to_thread(self.driver.end_session, session_id)


class WorkloadPolicy:
  """Decodes the workload's token count per turn on the real engine (no stop strings) and
  hands the agent a synthetic action in place of the random model's text."""

  chat = False

  def __init__(self, inner: EnginePolicy, workload: Workload):
    self.inner, self.workload, self.tokenizer = inner, workload, inner.tokenizer
    self.turn: dict[str, int] = {}

  async def complete(self, prompt, sampling, session_id=None) -> Completion:
    key = session_id.rsplit("/", 1)[0]  # Agent.run: "<group>/<sample>/<random>"
    tokens, answer = self.workload.episode(key)
    i = self.turn.get(session_id, 0)
    self.turn[session_id] = i + 1
    n = tokens[min(i, len(tokens) - 1)]
    sampling = dataclasses.replace(sampling, stop=(), stop_token_ids=(),
                                   max_new_tokens=min(n, sampling.max_new_tokens or n))
    c = await self.inner.complete(prompt, sampling, session_id)
    c.text = (f"<answer> {answer} </answer>" if i + 1 >= len(tokens)
              else f"<search> {key} turn {i} </search>")
    return c

  async def end_session(self, session_id: str) -> None:
    self.turn.pop(session_id, None)
    await self.inner.end_session(session_id)


class SleepySearch:
  """A search client whose calls take the workload's latency and return one short hit."""

  def __init__(self, workload: Workload):
    self.workload, self.cfg = workload, SearchClientSection(topk=1)

  async def search(self, queries, topk=None) -> list[ToolResult]:
    await asyncio.sleep(max(self.workload.latency(q) for q in queries))
    return [ToolResult("search", q, hits=(HIT,)) for q in queries]

  async def access(self, url: str) -> ToolResult:
    return ToolResult.failure("access", url, "not_found", "no pages in this benchmark")

  async def close(self) -> None:
    pass


# -- measurement hooks -------------------------------------------------------------------------

class TimedPublisher(DriverPublisher):
  """Notes when each version went live on the driver (the end of a learner step)."""

  def __init__(self, drivers):
    super().__init__(drivers)
    self.times: list[float] = []

  def publish(self, version: int, params) -> dict:
    out = super().publish(version, params)
    self.times.append(time.perf_counter())
    return out


class RecordingReplay(LocalReplay):
  """Records, for every leased group, the lag (learner version − token version) of each loss
  token, as `build_batch` counts it: tokens beyond the staleness limit are masked out of the
  loss (rl.stale_policy "mask") and counted apart."""

  def __init__(self, queue: ReplayQueue, limit: int):
    super().__init__(queue)
    self.limit, self.learner = limit, None
    self.hist: collections.Counter = collections.Counter()
    self.masked = 0
    self.turns: list[int] = []
    self.per_step: list[dict[int, int]] = []

  def lease(self, count, timeout_s, wait_s=0.0):
    lease = super().lease(count, timeout_s, wait_s)
    if lease is not None and self.learner is not None:
      v, step = self.learner.version, collections.Counter()
      for g in lease.groups:
        for raw in g.trajectories:
          t = Trajectory.from_record(raw)
          self.turns.append(t.num_turns)
          lag = v - t.version[np.asarray(t.loss_mask, bool)]
          self.masked += int((lag > self.limit).sum())
          step.update(lag[lag <= self.limit].tolist())
      self.hist.update(step)
      self.per_step.append(dict(step))
    return lease


class CompileCounter:
  """Compilations while `active`: there should be none in timing."""

  def __init__(self):
    self.active, self.names, self.seconds = False, [], 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def reset(self, active: bool) -> None:
    self.active, self.names, self.seconds = active, [], 0.0

  def _on(self, event: str, duration: float, fun_name: str = "", **_):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.names.append(fun_name)
      self.seconds += duration


def cpu_seconds() -> tuple[float, float]:
  """(busy CPU seconds of the whole machine, of this process): the difference is what other
  processes took, which would skew a timing on a shared 2-core machine."""
  own = sum(os.times()[:2])
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError):
    busy = float("nan")
  return busy, own


# -- one run -----------------------------------------------------------------------------------

def warm_learner(learner: Learner, rl, max_micro_batches: int) -> int:
  """Compiles the PPO step for each shape a batch can have (a power of two of micro-batches in
  each of the rl.ppo_n_minibatches parts, and every LM-head width, `head_widths`) on copied
  weights, so the learner's own state is untouched. Twice per shape: the step's outputs come
  back with other shardings than the model's initial arrays, so the second step compiles
  again."""
  shapes = 0
  m = rl.ppo_n_minibatches
  while m <= max(max_micro_batches, rl.ppo_n_minibatches):
    shape = (m, rl.micro_batch_rows, rl.row_tokens)
    z = lambda dtype: np.zeros(shape, dtype)  # noqa: E731
    for width in head_widths(rl.row_tokens):
      batch = shard_batch(TrainBatch(
          tokens=z(np.int32), positions=z(np.int32), segment_ids=z(np.int32), loss_mask=z(bool),
          behav_logp=z(np.float32), advantages=z(np.float32), versions=z(np.int32),
          num_tokens=np.asarray(1, np.int32), learner_version=np.asarray(0, np.int32),
          select=np.full(shape[:2] + (width,), rl.row_tokens - 1, np.int32)), learner.mesh)
      state = jax.tree.map(jnp.copy, (learner.params, learner.opt_state))
      for _ in range(2):
        state = learner.step_fn(*state, batch)[:2]
        shapes += 1
      jax.block_until_ready(state)
    m *= 2
  return shapes


def max_micro_batches(rl, max_len: int) -> int:
  """The most micro-batches one step can have: every trajectory at max_len, packed, an equal
  share in each of the rl.ppo_n_minibatches parts (build_batch pads each part to the same
  power of two)."""
  n = rl.ppo_n_minibatches
  rows = math.ceil(rl.batch_groups * rl.group_size / n) * math.ceil(max_len / rl.row_tokens)
  m = math.ceil(rows / rl.micro_batch_rows)
  return n * (1 << (m - 1).bit_length())


def warm_driver(driver: Driver) -> None:
  """One sampled request: the host-side key derivation compiles on first use."""
  driver.generate([1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=2, seed=2**40 + 1))


def run_one(cfg, eta: int, args, workload: Workload, tokenizer, mesh, items, work: str,
            counter: CompileCounter) -> dict:
  rl = cfg.rl.model_copy(update={"max_head_offpolicyness": eta,
                                 "max_concurrent_groups": (eta + 1) * cfg.rl.batch_groups})
  out_dir = os.path.join(work, f"eta{eta}")
  cfg = cfg.model_copy(update={"rl": rl, "checkpoint": cfg.checkpoint.model_copy(update={
      "directory": os.path.join(out_dir, "checkpoints")})})
  m = cfg.model
  make = lambda: create_model(m.arch, mesh, seed=m.seed, param_dtype=m.param_dtype,  # noqa: E731
                              dtype=m.dtype, attention_impl=m.attention)
  engine = Engine(make(), slots=args.slots, max_len=args.max_len, mesh=mesh,
                  min_prefill_bucket=args.min_prefill_bucket)
  t = time.perf_counter()
  engine_shapes = engine.warmup()
  engine_warm_s = time.perf_counter() - t
  driver = Driver(engine, tokenizer=tokenizer, device_sessions=args.device_sessions).start()
  warm_driver(driver)
  publisher = TimedPublisher([driver])
  replay = RecordingReplay(ReplayQueue(None), staleness_limit(rl))
  learner = Learner(cfg, model=make(), replay=replay, publisher=publisher, out_dir=out_dir,
                    echo=(lambda s: print(f"  [eta={eta}] {s}", flush=True)) if args.verbose
                    else (lambda s: None))
  replay.learner = learner
  t = time.perf_counter()
  learner_shapes = warm_learner(learner, rl, min(args.max_micro_batches,
                                                 max_micro_batches(rl, args.max_len)))
  learner_warm_s = time.perf_counter() - t
  print(f"eta={eta}: compiled {engine_shapes} engine shapes in {engine_warm_s:.1f}s and "
        f"{learner_shapes} learner step shapes in {learner_warm_s:.1f}s", flush=True)

  agent = Agent(cfg.agent, WorkloadPolicy(EnginePolicy(driver, tokenizer), workload),
                SleepySearch(workload))
  worker = RolloutWorker(worker=0, workers=1, rl=rl, agent=agent, scorer=Scorer(cfg.reward),
                         replay=replay.aio, prompts=PromptStream(items, rl.seed), seed=rl.seed)
  loop_box: dict = {}
  ready = threading.Event()

  def rollout():
    async def main():
      loop_box["loop"], loop_box["stop"] = asyncio.get_running_loop(), asyncio.Event()
      ready.set()
      await worker.run(stop=loop_box["stop"])
    try:
      asyncio.run(main())
    except BaseException as e:  # noqa: BLE001 -- reported by the main thread
      loop_box["error"] = e
      ready.set()

  generated0 = driver.stats().generated_tokens
  counter.reset(True)
  thread = threading.Thread(target=rollout, name="rollout", daemon=True)
  cpu0 = cpu_seconds()
  start = time.perf_counter()
  thread.start()
  ready.wait()
  try:
    learner.run(steps=args.steps)
  finally:
    counter.active = False
    cpu1, end = cpu_seconds(), time.perf_counter()
    if "loop" in loop_box:
      loop_box["loop"].call_soon_threadsafe(loop_box["stop"].set)
    thread.join(timeout=60)
    generated = driver.stats().generated_tokens - generated0
    learner.close()
    driver.stop()
  if "error" in loop_box:
    raise RuntimeError("the rollout worker failed") from loop_box["error"]
  if len(publisher.times) < args.steps:
    raise RuntimeError(f"the learner stopped after {len(publisher.times)} of {args.steps} steps")
  wall = publisher.times[args.steps - 1] - start
  steps = read_lines(os.path.join(out_dir, "metrics.jsonl"))
  per_step = [int(s.get("num_tokens", 0)) for s in steps]
  tokens = sum(per_step)
  w = args.ramp_steps
  steady_wall = publisher.times[args.steps - 1] - publisher.times[w - 1] if w else wall
  hist = {int(k): int(v) for k, v in sorted(replay.hist.items())}
  n = sum(hist.values())
  turns = np.asarray(replay.turns)
  logged_mean = [s.get("staleness_mean") for s in steps]
  mine_mean = [sum(k * c for k, c in h.items()) / max(sum(h.values()), 1)
               for h in replay.per_step]
  return {
      "eta": eta, "steps": args.steps, "wall_s": wall, "trained_tokens": tokens,
      "tokens_per_s": tokens / wall, "steps_per_s": args.steps / wall,
      "steady": {"after_steps": w, "wall_s": steady_wall, "trained_tokens": sum(per_step[w:]),
                 "tokens_per_s": sum(per_step[w:]) / steady_wall,
                 "steps_per_s": (args.steps - w) / steady_wall},
      "wait_s_mean": float(np.mean([s["wait_s"] for s in steps])),
      "train_s_mean": float(np.mean([s["train_s"] for s in steps])),
      "publish_s_mean": float(np.mean([s["publish_s"] for s in steps])),
      "step_s": [s["step_s"] for s in steps], "wait_s": [s["wait_s"] for s in steps],
      "num_tokens": per_step, "publish_t": [t - start for t in publisher.times],
      "staleness_hist": hist,
      "staleness_mean": sum(k * c for k, c in hist.items()) / max(n, 1),
      "staleness_max": max(hist) if hist else 0,
      "tokens_masked_stale": replay.masked,
      "tokens_masked_stale_logged": int(sum(s.get("tokens_masked_stale", 0) for s in steps)),
      "staleness_mean_logged": logged_mean,
      "staleness_matches_learner": all(
          a is not None and abs(a - b) < 1e-9 for a, b in zip(logged_mean, mine_mean)),
      "trained_episode_turns": {"mean": float(turns.mean()), "p50": float(np.median(turns)),
                                "p90": float(np.percentile(turns, 90)),
                                "max": int(turns.max())},
      "cpu_cores_used": {"this_process": (cpu1[1] - cpu0[1]) / (end - start),
                         "other_processes": max(0.0, cpu1[0] - cpu0[0] - cpu1[1] + cpu0[1]) /
                         (end - start)},
      "generated_tokens": int(generated), "generated_tokens_per_s": generated / wall,
      "worker": dataclasses.asdict(worker.stats),
      "compiles_during_timing": list(counter.names),
      "compile_s_during_timing": counter.seconds,
      "engine_warmup": {"shapes": engine_shapes, "s": engine_warm_s},
      "learner_warmup": {"shapes": learner_shapes, "s": learner_warm_s},
  }


def workload_tokenizer(items, vocab_size: int):
  """A byte-level BPE tokenizer with merges learned on this workload's own text (prompt and
  tool observation), so that an observation costs ~20 tokens instead of ~60 bytes and a
  24-turn episode fits a short context: what a real tokenizer does for real text."""
  obs = observation(ToolResult("search", "q", hits=(HIT,)).render())
  texts = [f"\n\n{obs}\n<think>\n"] * 64 + [PROMPT.replace("${question}", it.question)
                                            for it in items]
  tok = build_tokenizer(texts, vocab_size=min(vocab_size, 512) - 16)
  top = max(tok.encode("".join(texts[63:]) + "".join(QWEN_SPECIAL_TOKENS)))
  if top >= vocab_size:
    raise ValueError(f"tokenizer ids reach {top}, the model's vocabulary is {vocab_size}")
  return tok


# -- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/debug.yaml")
  p.add_argument("--etas", type=int, nargs="+", default=[0, 4])
  p.add_argument("--steps", type=int, default=12, help="timed learner steps per run")
  p.add_argument("--ramp-steps", type=int, default=2,
                 help="the steady-state figure leaves out the first steps (pipeline fill)")
  p.add_argument("--batch-groups", type=int, default=4, help="B groups per step")
  p.add_argument("--group-size", type=int, default=4, help="G episodes per group")
  p.add_argument("--ppo-minibatches", type=int, default=4,
                 help="PPO updates a step (rl.ppo_n_minibatches; the recorded runs used 4)")
  p.add_argument("--slots", type=int, default=16, help="decode slots")
  p.add_argument("--max-len", type=int, default=1024, help="decode max_len = context budget")
  p.add_argument("--min-prefill-bucket", type=int, default=64)
  p.add_argument("--device-sessions", type=int, default=128)
  p.add_argument("--max-micro-batches", type=int, default=8,
                 help="compile the learner step up to this many micro-batches of one row "
                 "(a larger step compiles while timed, and is reported)")
  p.add_argument("--seed", type=int, default=0, help="workload seed")
  p.add_argument("--max-turns", type=int, default=Workload.max_turns)
  p.add_argument("--turn-alpha", type=float, default=Workload.turn_alpha)
  p.add_argument("--latency-median", type=float, default=Workload.latency_median_s)
  p.add_argument("--latency-sigma", type=float, default=Workload.latency_sigma)
  p.add_argument("--verbose", action="store_true", help="print the learner's step lines")
  p.add_argument("--results", help="JSON output (default: benchmarks/results/...)")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args(argv)

  work = tempfile.mkdtemp(prefix="async_vs_sync_")
  counter = CompileCounter()
  try:
    workload = Workload(seed=args.seed, turn_alpha=args.turn_alpha, max_turns=args.max_turns,
                        latency_median_s=args.latency_median, latency_sigma=args.latency_sigma)
    prompt = os.path.join(work, "prompt.txt")
    with open(prompt, "w") as f:
      f.write(PROMPT)
    cfg = load_config(args.config, args.overrides)
    b, g = args.batch_groups, args.group_size
    cfg = cfg.model_copy(update={
        "agent": AgentSection(prompt=prompt, max_turns=workload.max_turns,
                              max_new_tokens=workload.tokens_cap,
                              max_context_tokens=args.max_len, temperature=1.0),
        "reward": cfg.reward.model_copy(update={"metric": "em"}),
        "rl": cfg.rl.model_copy(update={
            "group_size": g, "batch_groups": b, "row_tokens": args.max_len,
            "ppo_n_minibatches": args.ppo_minibatches,
            "micro_batch_rows": 1, "total_steps": args.steps, "lease_timeout_s": 600.0,
            "temperature": 1.0}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": 10**9,
                                                        "async_save": False}),
    })
    arch = cfg.model.arch
    mesh = make_mesh(cfg.mesh.shape())
    kind = jax.devices()[0].device_kind
    items = [QAItem(f"q{i}", f"is {i} a number?", ("yes",)) for i in range(256)]
    tokenizer = workload_tokenizer(items, arch.vocab_size)
    print(f"device: {len(jax.devices())} x {kind}; model {arch.family} "
          f"{arch.num_params() / 1e6:.2f}M params; B={b} groups of G={g}; {args.steps} steps; "
          f"turns 1+Pareto({workload.turn_alpha}) <= {workload.max_turns} "
          f"(mean {workload.expected_turns():.1f}); search latency lognormal median "
          f"{workload.latency_median_s}s sigma {workload.latency_sigma}", flush=True)
    runs = []
    for eta in args.etas:
      r = run_one(cfg, eta, args, workload, tokenizer, mesh, items, work, counter)
      runs.append(r)
      hist = " ".join(f"{k}:{v}" for k, v in r["staleness_hist"].items())
      print(f"eta={eta}: {r['tokens_per_s']:8.1f} trained tok/s ({r['trained_tokens']} tokens "
            f"in {r['wall_s']:.1f}s), wait {r['wait_s_mean']:.2f}s/step, train "
            f"{r['train_s_mean']:.2f}s/step, staleness mean {r['staleness_mean']:.2f} max "
            f"{r['staleness_max']} [{hist}], masked stale {r['tokens_masked_stale']}, "
            f"compiles in timing {r['compiles_during_timing']}; CPU cores used: this process "
            f"{r['cpu_cores_used']['this_process']:.2f}, others "
            f"{r['cpu_cores_used']['other_processes']:.2f}", flush=True)
      if r["cpu_cores_used"]["other_processes"] > 0.2:
        print(f"warning: other processes used {r['cpu_cores_used']['other_processes']:.2f} "
              "cores during this timing", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  base = next((r for r in runs if r["eta"] == 0), None)
  top = max(runs, key=lambda r: r["eta"])
  both = base is not None and top is not base
  ratio = top["tokens_per_s"] / base["tokens_per_s"] if both else None
  steady = top["steady"]["tokens_per_s"] / base["steady"]["tokens_per_s"] if both else None
  step_ratio = top["steps_per_s"] / base["steps_per_s"] if both else None
  print()
  print(f"{'eta':>4} {'tok/s':>8} {'steady':>8} {'wall s':>7} {'tokens':>7} {'steps/s':>7} "
        f"{'wait s':>7} {'train s':>7} {'gen tok/s':>9} {'turns':>5} {'stale':>5} {'masked':>6}  "
        f"staleness")
  for r in runs:
    hist = " ".join(f"{k}:{v}" for k, v in r["staleness_hist"].items())
    print(f"{r['eta']:>4} {r['tokens_per_s']:>8.1f} {r['steady']['tokens_per_s']:>8.1f} "
          f"{r['wall_s']:>7.1f} {r['trained_tokens']:>7} {r['steps_per_s']:>7.3f} "
          f"{r['wait_s_mean']:>7.2f} {r['train_s_mean']:>7.2f} "
          f"{r['generated_tokens_per_s']:>9.1f} {r['trained_episode_turns']['mean']:>5.2f} "
          f"{r['staleness_mean']:>5.2f} "
          f"{r['tokens_masked_stale']:>6}  {hist}")
  print("tok/s: trained (loss) tokens per second from the learner's start; steady: after the "
        "ramp steps; gen tok/s: tokens the engine sampled; turns: mean turns of the trained "
        "episodes; stale: mean staleness; masked: loss tokens over the staleness limit")
  if both:
    print(f"trained tokens/s, eta={top['eta']} over eta=0: x{ratio:.2f} from the learner's start "
          f"(goal >= x{GOAL:.0f}: {'met' if ratio >= GOAL else 'not met'}), x{steady:.2f} after "
          f"{args.ramp_steps} steps; steps/s x{step_ratio:.2f}")
  zero = None if base is None else set(base["staleness_hist"]) <= {0} and \
      base["tokens_masked_stale"] == 0
  if base is not None:
    print(f"eta=0: every trained token had the learner's version: {zero}")
  result = {
      "benchmark": "async_vs_sync", "config": args.config, "overrides": args.overrides,
      **run_info(), "device_kind": kind, "num_devices": len(jax.devices()),
      "params": arch.num_params(), "batch_groups": b, "group_size": g, "steps": args.steps,
      "slots": args.slots, "max_len": args.max_len, "args": vars(args),
      "workload": dataclasses.asdict(workload), "expected_turns": workload.expected_turns(),
      "timing": "from the learner's start (worker started with it, every engine and learner "
                "step shape compiled before) to the publication of its last step; 'steady' "
                "leaves out the first ramp_steps steps; trained tokens = loss tokens",
      "runs": runs, "speedup": ratio, "steady_speedup": steady, "steps_speedup": step_ratio,
      "goal": GOAL, "goal_met": None if ratio is None else ratio >= GOAL,
      "eta0_staleness_all_zero": zero}
  write_result(result, args.results, f"async_vs_sync_{kind}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
