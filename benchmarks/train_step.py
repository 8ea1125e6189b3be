#!/usr/bin/env python
"""Training-step throughput and model FLOPs utilisation (forward + backward + AdamW).

  python benchmarks/train_step.py --config configs/bench/qwen2.5-1.5b.yaml --batch 1 \
      --seq-len 4096 --steps 10 [key=value overrides]
  python benchmarks/train_step.py --config configs/debug.yaml --episodes 8 model.attention=blockwise

With --episodes the same tokens are also timed packed as many episodes a row (what RL rows
hold), side by side with one causal sequence: attention that skips the blocks a mask hides
costs about Σ len² there, where a dense mask costs T².

With --loss-share S the loss falls on a share S of the tokens (the agent's own, amid prompts
and tool output), and the step is also timed with the LM head on those positions alone
(`PackedBatch.select`, as `asearcher sft` runs it), side by side with the head on every one.

Model FLOPs per token follow PaLM (appendix B): 6 x (matmul parameters, LM head
included) + 12 x layers x heads x head_dim x seq_len for attention. MFU divides
the achieved rate by the device's dense bf16 peak (a table below, or
--peak-tflops); on a CPU no peak is assumed and only tokens/s is reported.
Results are printed and written as JSON with device, versions and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from asearcher_jax.config import load_config  # noqa: E402
from asearcher_jax.memory_plan import resolve_remat  # noqa: E402
from asearcher_jax.models import create_model  # noqa: E402
from asearcher_jax.models.attention import resolve_impl_for  # noqa: E402
from asearcher_jax.models.config import QwenConfig  # noqa: E402
from asearcher_jax.sharding import describe, make_mesh  # noqa: E402
from asearcher_jax.train.lm import PackedBatch, loss_positions, make_sft_step  # noqa: E402
from asearcher_jax.train.optimizer import make_optimizer  # noqa: E402
from benchmarks import device_profile  # noqa: E402
from benchmarks.common import device_figure, run_info, write_result  # noqa: E402

# Dense bf16 peak TFLOP/s per device (vendor figures, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU7x": 2307.0}


def flops_per_token(cfg: QwenConfig, seq_len: int) -> float:
  e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * e * f
  matmul_params = cfg.num_layers * per_layer + e * cfg.vocab_size
  attention = 12 * cfg.num_layers * cfg.num_heads * d * seq_len
  return 6 * matmul_params + attention


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--batch", type=int, default=1, help="rows per step (global)")
  p.add_argument("--seq-len", type=int, default=4096)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
  p.add_argument("--peak-tflops", type=float, help="override the per-device peak")
  p.add_argument("--results", help="JSON output (default: benchmarks/results/...)")
  p.add_argument("--episodes", type=int, default=0,
                 help="also time rows packed with this many episodes per row (segment ids and "
                      "positions restart per episode), side by side with one causal sequence")
  p.add_argument("--episode-len", type=int, nargs=2, default=(128, 1024), metavar=("MIN", "MAX"),
                 help="episode lengths for --episodes, drawn uniformly; the row's length is "
                      "their sum (--seq-len is ignored)")
  p.add_argument("--loss-share", type=float, default=0.0,
                 help="also time the step with the loss on this share of the tokens and the "
                      "LM head on those positions alone, side by side with the whole row")
  p.add_argument("--no-profile", action="store_true", help="skip the profile of the step")
  p.add_argument("overrides", nargs="*")
  args = p.parse_args(argv)

  # the rl section only sizes the step for the remat choice: this batch's rows and row length
  row = args.episodes * args.episode_len[1] if args.episodes else args.seq_len  # at most
  cfg = load_config(args.config, args.overrides + [f"rl.micro_batch_rows={args.batch}",
                                                   f"rl.row_tokens={row}"])
  arch = cfg.model.arch
  if arch is None:
    raise SystemExit("the benchmark initialises at random: the config needs model.arch")
  cfg = resolve_remat(cfg, echo=print)
  mesh = make_mesh(cfg.mesh.shape())
  devices = jax.devices()
  kind = devices[0].device_kind
  # the kernel `auto` picks here (the model resolves it the same way, from its compute dtype)
  attention_impl = resolve_impl_for(cfg.model.attention, jax.default_backend(), cfg.model.dtype,
                                    arch.head_dim)
  print(f"device: {len(devices)} x {kind} ({jax.default_backend()}); mesh {describe(mesh)}")
  print(f"model: {arch.family} {arch.num_params() / 1e6:,.1f}M params, dtype {cfg.model.dtype}, "
        f"params {cfg.model.param_dtype}, remat {cfg.model.remat}, attention "
        f"{cfg.model.attention}" + ("" if attention_impl == cfg.model.attention
                                    else f" ({attention_impl})"))

  with jax.set_mesh(mesh):
    model = create_model(arch, mesh, seed=cfg.model.seed, param_dtype=cfg.model.param_dtype,
                         dtype=cfg.model.dtype, attention_impl=cfg.model.attention,
                         remat=cfg.model.remat)
    params, opt_state, step = make_sft_step(
        model, make_optimizer(cfg.optimizer, args.warmup + args.steps))
    del model
    rng = np.random.default_rng(0)
    if args.episodes:
      lengths = rng.integers(args.episode_len[0], args.episode_len[1] + 1, args.episodes)
      args.seq_len = int(lengths.sum())
      positions = np.concatenate([np.arange(n) for n in lengths])
      segments = np.repeat(np.arange(1, args.episodes + 1), lengths)
    shape = (args.batch, args.seq_len)
    rows = ("data", "fsdp") if args.batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows))
    batch = PackedBatch(
        tokens=jnp.asarray(rng.integers(0, arch.vocab_size, shape, dtype=np.int32)),
        positions=jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), shape),
        segment_ids=jnp.ones(shape, jnp.int32),
        loss_mask=jnp.ones(shape, bool))
    batch = jax.device_put(batch, batch_sharding)

    def timed(batch):
      nonlocal params, opt_state
      t0 = time.perf_counter()
      for _ in range(args.warmup):
        params, opt_state, metrics = step(params, opt_state, batch)
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.steps):
        t = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
      return compile_s, times, metrics

    # XLA's buffer assignment for the step (every platform) and, where the runtime reports it,
    # the device's peak after the timed steps
    t0 = time.perf_counter()
    # compiled once: timed and measured (`jitted` compiles --loss-share's other batch)
    jitted, step = step, step.lower(params, opt_state, batch).compile()
    memory = step.memory_analysis()
    compile_s, times, metrics = timed(batch)
    compile_s = time.perf_counter() - t0 - sum(times)  # the compile and the warmup steps
    peak_bytes = (devices[0].memory_stats() or {}).get("peak_bytes_in_use")
    profile = None
    if not args.no_profile:  # three more steps under the profiler: where the device time goes
      def three_steps():
        nonlocal params, opt_state
        for _ in range(3):
          params, opt_state, m = step(params, opt_state, batch)
        return m
      profile = device_profile.op_split(three_steps, step.as_text(), 3)
    packed = None
    if args.episodes:  # the same tokens, packed: one compiled program, other masks
      _, packed_times, _ = timed(jax.device_put(PackedBatch(
          tokens=batch.tokens,
          positions=jnp.broadcast_to(jnp.asarray(positions, jnp.int32), shape),
          segment_ids=jnp.broadcast_to(jnp.asarray(segments, jnp.int32), shape),
          loss_mask=batch.loss_mask), batch_sharding))
      packed = {"episodes": args.episodes, "episode_lengths": [int(n) for n in lengths],
                "step_s_median": round(float(np.median(packed_times)), 5),
                "step_s_all": [round(t, 5) for t in packed_times]}
      packed["vs_one_sequence"] = round(packed["step_s_median"] / float(np.median(times)), 3)

    selected = None
    if args.loss_share:  # the same rows, the loss on a share of them: whole row against select
      mask = rng.random(shape) < args.loss_share
      select = loss_positions(np.asarray(batch.segment_ids), mask)
      masked = jax.device_put(PackedBatch(batch.tokens, batch.positions, batch.segment_ids,
                                          jnp.asarray(mask)), batch_sharding)
      step = jitted
      _, whole_times, _ = timed(masked)
      _, select_times, _ = timed(jax.device_put(
          dataclasses.replace(masked, select=jnp.asarray(select)), batch_sharding))
      selected = {"loss_share": args.loss_share, "head_positions": int(select.shape[1]),
                  "whole_row_step_s_median": round(float(np.median(whole_times)), 5),
                  "step_s_median": round(float(np.median(select_times)), 5),
                  "step_s_all": [round(t, 5) for t in select_times]}
      selected["vs_whole_row"] = round(selected["step_s_median"]
                                       / selected["whole_row_step_s_median"], 3)

  step_s = float(np.median(times))
  tokens = args.batch * args.seq_len
  tok_s = tokens / step_s
  achieved = flops_per_token(arch, args.seq_len) * tok_s / 1e12
  peak = args.peak_tflops or device_figure(PEAK_TFLOPS, kind)
  mfu = achieved / (peak * len(devices)) if peak else None
  result = {
      "benchmark": "train_step", "config": args.config, "overrides": args.overrides,
      **run_info(), "device_kind": kind, "num_devices": len(devices),
      "backend": jax.default_backend(), "mesh": dict(mesh.shape),
      "params": arch.num_params(), "batch": args.batch, "seq_len": args.seq_len,
      "dtype": cfg.model.dtype, "remat": cfg.model.remat, "attention": cfg.model.attention,
      "attention_impl": attention_impl,
      "warmup_s": round(compile_s, 3), "step_s_median": round(step_s, 5),
      "step_s_all": [round(t, 5) for t in times], "tokens_per_s": round(tok_s, 1),
      "tokens_per_s_per_device": round(tok_s / len(devices), 1),
      "model_tflops_per_s": round(achieved, 4), "peak_tflops_per_device": peak,
      "mfu": None if mfu is None else round(mfu, 4), "final_loss": float(metrics["loss"]),
      "packed": packed, "loss_positions": selected, "profile": profile,
      "xla_temp_bytes": memory.temp_size_in_bytes,
      "xla_argument_bytes": memory.argument_size_in_bytes,
      "peak_device_bytes": peak_bytes,
  }
  print(f"warmup+compile {compile_s:.1f}s; step {step_s * 1e3:.1f} ms (median of {args.steps}); "
        f"{tok_s:,.0f} tokens/s; {achieved:.3f} model TFLOP/s; "
        f"MFU {'n/a (no peak for this device)' if mfu is None else f'{100 * mfu:.1f}%'}; "
        f"loss {result['final_loss']:.4f}")
  print(f"memory: XLA temporaries {memory.temp_size_in_bytes / 2**30:.3f} GiB + arguments "
        f"{memory.argument_size_in_bytes / 2**30:.3f} GiB; device peak "
        + ("n/a" if peak_bytes is None else f"{peak_bytes / 2**30:.3f} GiB"))
  if profile:
    print(f"profile: {device_profile.describe(profile)}")
  if packed:
    print(f"{args.episodes} packed episodes in the same {args.seq_len} tokens: step "
          f"{packed['step_s_median'] * 1e3:.1f} ms, {packed['vs_one_sequence']:.2f}x one causal "
          "sequence")
  if selected:
    print(f"loss on {args.loss_share:.0%} of the tokens, the LM head on those "
          f"{selected['head_positions']} positions a row: step "
          f"{selected['step_s_median'] * 1e3:.1f} ms against "
          f"{selected['whole_row_step_s_median'] * 1e3:.1f} ms on the whole row "
          f"({selected['vs_whole_row']:.2f}x)")
  config_name = os.path.splitext(os.path.basename(args.config))[0]
  write_result(result, args.results,
               f"train_step_{kind}_{config_name}_b{args.batch}_s{args.seq_len}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
