#!/usr/bin/env python
"""Decode throughput, time to first token, and prefill saved by multi-turn KV reuse.

  python benchmarks/decode.py --config configs/debug.yaml [--batches 1 8 32 64] [key=value ...]

Side by side in one run, on the same random weights and prompts: our engine and
continuous-batching driver against Hugging Face transformers' `generate`
(PyTorch, same device class) at each batch size, greedy, a fixed number of new
tokens; ours both with the platform's steps per dispatch (`serve.decode_steps`:
1 on CPU, 8 on accelerators) and with the other choice, the block decoding's own
gain. Then a 20-turn episode with and without a session, counting prefilled
tokens, and the mixed-length workload: the decode step with one long context
(`--long-context` tokens) among short ones against short ones only, which with
the XLA paged path costs every slot the long one's reads and with the Pallas
kernel (`--paged-attention pallas`, GPUs and TPUs) should not. On a GPU it also reports
the decode step against the memory roofline ((weights + KV bytes) / HBM
bandwidth); on a CPU, against the step's measured floor (`step_floor`: its matmuls
alone plus one read of its KV) and the speedup over `generate` a step at that floor
would give. Weights are held as a decode server holds them (`serving_param_dtype`), and
`serve.quantization=int8` serves int8 matmul weights (the roofline counts the bytes as
stored; `generate` keeps the float model). The last batch's step is then profiled: its
device time and the split into matmul, attention, sampling and other
(benchmarks/device_profile.py). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from asearcher_jax.config import load_config  # noqa: E402
from asearcher_jax.inference import Driver, Engine, Request, SamplingParams  # noqa: E402
from asearcher_jax.models import create_model, save_pretrained  # noqa: E402
from asearcher_jax.models.paged_kv import platform_kernel  # noqa: E402
from asearcher_jax.placement import serving_param_dtype  # noqa: E402
from asearcher_jax.sharding import make_mesh  # noqa: E402
from benchmarks import device_profile  # noqa: E402
from benchmarks.common import device_figure, run_info, write_result  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "TPU v5p": 2.76e12,
                   "TPU v5 lite": 0.82e12, "TPU v6 lite": 1.64e12}


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
  sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
  walls, ttfts, steps = [], [], []

  def run(d: Driver) -> list[Request]:
    reqs = [d.submit(Request(p, sampling)) for p in prompts]
    for r in reqs:
      r.wait()
    return reqs

  with Driver(engine) as d:  # compiles every bucket the workload meets: not timed
    run(d)
  # A driver of its own, so the step times it keeps (its last 64 dispatches) are the timed
  # rounds' alone, not the compiling round's.
  with Driver(engine) as d:
    for _ in range(repeats):
      start = time.perf_counter()
      reqs = run(d)
      walls.append(time.perf_counter() - start)
      ttfts.append(float(np.mean([r.first_token_at - r.submitted_at for r in reqs])))
      steps.append(d.stats().decode_step_s)
  tokens = sum(len(r.output_ids) for r in reqs)
  wall = float(np.median(walls))
  return {"tokens_per_s": tokens / wall, "ttft_s": float(np.median(ttfts)), "wall_s": wall,
          "wall_s_all": walls, "step_s": float(np.median(steps))}


def hf(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
  import torch
  ids = torch.tensor(prompts, device=model.device)

  def generate(x, n):
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    if out.is_cuda:
      torch.cuda.synchronize()
    return out

  walls, ttfts = [], []
  with torch.no_grad():
    generate(ids[:1], 2)  # warm up
    for _ in range(repeats):
      t = time.perf_counter()
      generate(ids, 1)
      ttfts.append(time.perf_counter() - t)
      t = time.perf_counter()
      out = generate(ids, new_tokens)
      walls.append(time.perf_counter() - t)
  tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
  wall = float(np.median(walls))
  return {"tokens_per_s": tokens / wall, "ttft_s": float(np.median(ttfts)), "wall_s": wall,
          "wall_s_all": walls}


def multi_turn(engine: Engine, turns: int, gen: int, tool: int, rng) -> dict:
  sampling = SamplingParams(temperature=0.0, max_new_tokens=gen)
  out = {}
  first = rng.integers(0, engine.cfg.vocab_size, 64).tolist()
  tools = [rng.integers(0, engine.cfg.vocab_size, tool).tolist() for _ in range(turns)]
  for mode in ("session", "full_prefill"):
    with Driver(engine) as d:
      for attempt in range(2):  # the first episode compiles, the second is timed
        context, prefilled = list(first), 0
        start = time.perf_counter()
        for turn in range(turns):
          r = d.generate(context, sampling,
                         session_id=f"episode-{attempt}" if mode == "session" else None)
          prefilled += r.prefilled_tokens
          context = context + r.output_ids + tools[turn]
    out[mode] = {"prefilled_tokens": prefilled, "wall_s": time.perf_counter() - start,
                 "final_context": len(context)}
  out["prefill_saved"] = 1 - out["session"]["prefilled_tokens"] / out["full_prefill"][
      "prefilled_tokens"]
  return out


def mixed_length(model, mesh, batch: int, prompt_len: int, long: int, new_tokens: int,
                 steps: int, kernel: str, quantization: str, repeats: int, rng) -> dict:
  """Decode step time with one `long`-token context among `batch` - 1 short ones, against
  `batch` short ones, on the same engine (so the same compiled programs and pool)."""
  engine = Engine(model, slots=batch, max_len=long + new_tokens + 8, mesh=mesh,
                  decode_steps=steps, paged_kernel=kernel, quantization=quantization)
  short = rng.integers(0, engine.cfg.vocab_size, (batch, prompt_len)).tolist()
  mixed = [rng.integers(0, engine.cfg.vocab_size, long).tolist()] + short[1:]
  out = {"batch": batch, "long_context": long, "paged_attention": kernel,
         "short_only": ours(engine, short, new_tokens, repeats),
         "one_long": ours(engine, mixed, new_tokens, repeats)}
  out["step_ratio"] = out["one_long"]["step_s"] / out["short_only"]["step_s"]
  return out


def roofline(engine: Engine, batch: int, context: int) -> dict | None:
  kind = jax.devices()[0].device_kind
  bw = device_figure(HBM_BYTES_PER_S, kind)
  if bw is None:
    return None
  cfg = engine.cfg
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.params))  # as stored and read
  kv_bytes = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * \
      engine.cache_dtype.itemsize
  return {"bytes_per_step": weight_bytes + kv_bytes,
          "roofline_step_s": (weight_bytes + kv_bytes) / bw,
          "hbm_bytes_per_s": bw}


def profile_step(engine: Engine, prompts: list[list[int]], steps: int = 16) -> dict:
  """`generate` with every slot live, under the profiler: the step's device time and its split
  (matmul, attention, sampling, other; benchmarks/device_profile.py)."""
  b = len(prompts)
  zeros = np.zeros((2,), np.uint32)
  prefix = engine.prefill_batch(engine.params, prompts, [0.0] * b, [0] * b, [1.0] * b, [zeros] * b)
  box = [engine.insert(prefix, engine.init_decode_state(), list(range(b)))]
  window = engine.bucket(min(len(prompts[0]) + 2 * steps, engine.max_len))
  programs = engine._programs  # the jitted step itself: its optimized HLO names the ops
  text = type(programs).generate.lower(programs, engine.params, box[0], window, 0).compile() \
      .as_text()

  def run():
    for _ in range(steps):
      box[0], _ = engine.generate(engine.params, box[0], window)
    return box[0]

  jax.block_until_ready(run())  # compiled and warm
  return {"window": window, **device_profile.op_split(run, text, steps)}


def _timed(f, *args, repeats: int = 7, n: int = 50) -> float:
  """Median seconds a call over `repeats` rounds of `n` calls, after one that compiles."""
  jax.block_until_ready(f(*args))
  rounds = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(n):
      out = f(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / n)
  return float(np.median(rounds))


def step_floor(model, batch: int, context: int) -> dict:
  """What a decode step cannot go below on this device, measured rather than taken from a
  datasheet (a CPU has no published figure for these shapes): the step's matmuls alone (every
  layer's projections and the LM head for `batch` tokens, the model's weights and dtype,
  scanned as the model scans) plus one read of the KV the step attends to (`context`
  positions of every slot and layer). Attention's arithmetic, sampling and dispatch are left
  out, so a real step is always above it."""
  cfg = model.cfg
  layers = jax.tree.map(lambda a: a.astype(model.dtype),
                        nnx.to_pure_dict(nnx.state(model.layers, nnx.Param)))
  head = model.head().astype(model.dtype)

  @jax.jit
  def matmuls(x, layers, head):
    def body(x, p):  # each product feeds the next, so no part of one is dropped as dead code
      qkv = jnp.einsum("bte,ekgd->btkgd", x, p["wqkv"])
      q = qkv[..., :-2, :].reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)
      kv_sum = jnp.sum(qkv[..., -2:, :], axis=(-3, -2, -1))[..., None]  # keeps k, v columns
      x = x + jnp.einsum("bthd,hde->bte", q, p["wo"]) + kv_sum
      gate_up = jnp.einsum("bte,ecf->btcf", x, p["w_gate_up"])
      return x + jnp.einsum("btf,fe->bte", gate_up[:, :, 0] * gate_up[:, :, 1], p["w_down"]), None
    x, _ = jax.lax.scan(body, x, layers)
    return jnp.einsum("bte,ev->btv", x, head, preferred_element_type=jnp.float32)

  kv = jnp.ones((2 * cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.head_dim),
                model.dtype)
  x = jnp.full((batch, 1, cfg.hidden_size), 0.01, model.dtype)
  out = {"matmul_s": _timed(matmuls, x, layers, head),
         "kv_read_s": _timed(jax.jit(jnp.sum), kv), "kv_bytes": kv.nbytes}
  out["floor_step_s"] = out["matmul_s"] + out["kv_read_s"]
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/debug.yaml")
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--turns", type=int, default=20,
                 help="turns of the multi-turn session workload (0 skips it)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
  p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
  p.add_argument("--long-context", type=int, default=512,
                 help="the long context of the mixed-length workload (0 skips it)")
  p.add_argument("--paged-attention", choices=["xla", "pallas"], default="xla",
                 help="decode attention over the KV pages (pallas: the GPU or TPU kernel)")
  p.add_argument("--no-profile", action="store_true",
                 help="skip the profile of the step at the last batch")
  p.add_argument("--results", help="JSON output (default: benchmarks/results/...)")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args(argv)
  cfg = load_config(args.config, args.overrides)
  arch = cfg.model.arch
  mesh = make_mesh(cfg.mesh.shape())
  kind = jax.devices()[0].device_kind
  # Weights as a decode server holds them: bfloat16 on accelerators unless the config pins
  # placement.decode_param_dtype, and int8 matmul weights with serve.quantization=int8.
  served, quantization = serving_param_dtype(cfg, jax.default_backend()), cfg.serve.quantization
  print(f"device: {len(jax.devices())} x {kind}; model {arch.family} "
        f"{arch.num_params() / 1e6:.1f}M params, dtype {cfg.model.dtype}, weights {served}"
        f"{', int8 matmul weights' if quantization == 'int8' else ''}")
  model = create_model(arch, mesh, seed=0, param_dtype=served,
                       dtype=cfg.model.dtype, attention_impl=cfg.model.attention)
  rng = np.random.default_rng(0)
  max_len = args.prompt_len + args.new_tokens + 8
  torch_model = None
  if not args.no_hf:
    import torch
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
      save_pretrained(model, os.path.join(d, "m"), progress=False)
      torch_model = AutoModelForCausalLM.from_pretrained(
          os.path.join(d, "m"), dtype=torch.float32 if cfg.model.dtype == "float32"
          else torch.bfloat16).eval()
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
      torch_model = torch_model.to("cuda")  # the same device class as ours

  kernel = platform_kernel(args.paged_attention, jax.default_backend())
  rows = []
  for b in args.batches:
    prompts = rng.integers(0, arch.vocab_size, (b, args.prompt_len)).tolist()
    k = cfg.serve.steps_per_dispatch(jax.default_backend())
    other = 8 if k == 1 else 1
    engine = Engine(model, slots=b, max_len=max_len, mesh=mesh, decode_steps=k,
                    paged_kernel=kernel, quantization=quantization)
    row = {"batch": b, "decode_steps": k,
           "ours": ours(engine, prompts, args.new_tokens, args.repeats)}
    alt = Engine(model, slots=b, max_len=max_len, mesh=mesh, decode_steps=other,
                 paged_kernel=kernel, quantization=quantization)
    row["ours_other_steps"] = {"decode_steps": other,
                               **ours(alt, prompts, args.new_tokens, args.repeats)}
    blocks, single = ((row["ours"], row["ours_other_steps"]) if k > 1
                      else (row["ours_other_steps"], row["ours"]))
    row["block_gain"] = blocks["tokens_per_s"] / single["tokens_per_s"]
    if torch_model is not None:
      row["transformers"] = hf(torch_model, prompts, args.new_tokens, args.repeats)
      row["speedup"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
    rf = roofline(engine, b, args.prompt_len + args.new_tokens // 2)
    if rf:
      rf["fraction_of_roofline"] = rf["roofline_step_s"] / row["ours"]["step_s"]
      row["roofline"] = rf
    elif quantization == "none":  # no bandwidth figure (CPUs): the float step's measured floor
      fl = step_floor(model, b, args.prompt_len + args.new_tokens // 2)
      fl["step_over_floor"] = row["ours"]["step_s"] / fl["floor_step_s"]
      if "transformers" in row:  # our prefill as measured, then every step at the floor
        best = b * args.new_tokens / (row["ours"]["ttft_s"] + args.new_tokens * fl["floor_step_s"])
        fl["speedup_at_floor"] = best / row["transformers"]["tokens_per_s"]
      row["floor"] = fl
    rows.append(row)
    hf_part = (f" | transformers {row['transformers']['tokens_per_s']:9.1f} tok/s, ttft "
               f"{row['transformers']['ttft_s'] * 1e3:7.1f} ms | x{row['speedup']:.2f}"
               if "transformers" in row else "")
    rf_part = ""
    if rf:
      rf_part = f" | {100 * rf['fraction_of_roofline']:.0f}% of HBM roofline"
    elif "floor" in row:
      fl = row["floor"]
      rf_part = (f" | step {row['ours']['step_s'] * 1e3:.2f} ms, {fl['step_over_floor']:.1f}x its "
                 f"floor {fl['floor_step_s'] * 1e3:.2f} ms")
      if "speedup_at_floor" in fl:
        rf_part += f" (x{fl['speedup_at_floor']:.2f} generate at the floor)"
    rf_part += (f" | {other} step(s) per dispatch "
                f"{row['ours_other_steps']['tokens_per_s']:9.1f} tok/s (blocks of 8 against "
                f"single steps: x{row['block_gain']:.2f})")
    print(f"batch {b:3d}: ours ({k} step(s) per dispatch) {row['ours']['tokens_per_s']:9.1f} "
          f"tok/s, ttft "
          f"{row['ours']['ttft_s'] * 1e3:7.1f} ms{hf_part}{rf_part}", flush=True)

  profile = None
  if not args.no_profile:  # the last batch's engine, every slot at the prompt's length
    profile = profile_step(engine, prompts[:engine.slots])
    print(f"profile, batch {engine.slots}, window {profile['window']}: "
          f"{device_profile.describe(profile)}")
  mt = None
  if args.turns:
    gen, tool = 16, 32
    mt_engine = Engine(model, slots=1, max_len=64 + args.turns * (gen + tool) + 8, mesh=mesh,
                       quantization=quantization)
    mt = multi_turn(mt_engine, args.turns, gen, tool, rng)
    print(f"{args.turns}-turn episode: prefilled {mt['session']['prefilled_tokens']} tokens "
          f"with a session vs {mt['full_prefill']['prefilled_tokens']} re-prefilling "
          f"({100 * mt['prefill_saved']:.0f}% saved); wall {mt['session']['wall_s']:.2f}s vs "
          f"{mt['full_prefill']['wall_s']:.2f}s")
  mixed = None
  if args.long_context:
    b = max(args.batches)
    mixed = mixed_length(model, mesh, b, args.prompt_len, args.long_context, args.new_tokens,
                         cfg.serve.steps_per_dispatch(jax.default_backend()), kernel,
                         quantization, args.repeats, rng)
    print(f"mixed lengths, batch {b}: one {args.long_context}-token context among short ones "
          f"steps in {mixed['one_long']['step_s'] * 1e3:.2f} ms against "
          f"{mixed['short_only']['step_s'] * 1e3:.2f} ms short only (x{mixed['step_ratio']:.2f}, "
          f"{args.paged_attention} paged attention)")
  result = {
      "benchmark": "decode", "config": args.config, "overrides": args.overrides,
      **run_info(("jax", "jaxlib", "flax", "torch", "transformers")), "device_kind": kind,
      "num_devices": len(jax.devices()), "params": arch.num_params(),
      "param_dtype": served, "quantization": quantization,
      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows,
      "paged_attention": args.paged_attention, "profile": profile, "multi_turn": mt,
      "mixed_length": mixed}
  if torch_model is not None:
    import torch
    result["torch_threads"] = torch.get_num_threads()
  config_name = os.path.splitext(os.path.basename(args.config))[0]
  write_result(result, args.results, f"decode_{kind}_{config_name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
