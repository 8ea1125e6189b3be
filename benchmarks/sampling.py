#!/usr/bin/env python
"""The cost of one decode step's sampling (`inference.sampling.sample`) by request kind.

  python benchmarks/sampling.py [--shapes 64x151936 16x4096] [--repeats 20]

Greedy, plain temperature, top-k 50 and top-p 0.9 rows, on logits shaped like a language
model's (normal noise with 32 likely tokens: top-p 0.9 keeps a few dozen). Top-k and top-p
read the first `TRUNCATION_PREFIX` tokens; side by side, the same call with the prefix set to
the whole vocabulary, which sorts every row (as sampling did before the prefix). Prints a
table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from asearcher_jax.inference import sampling  # noqa: E402
from benchmarks.common import run_info, write_result  # noqa: E402

KINDS = {"greedy": (0.0, 0, 1.0), "temperature 1": (1.0, 0, 1.0), "top-k 50": (1.0, 50, 1.0),
         "top-p 0.9": (1.0, 0, 0.9)}


def median_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", default=["64x151936", "16x4096"],
                 help="ROWSxVOCAB: 64 slots of Qwen2.5's vocabulary, the debug server's 16 of 4096")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--results", help="JSON output (default: benchmarks/results/sampling_cpu.json)")
  args = p.parse_args(argv)
  kind = jax.devices()[0].device_kind
  rows = []
  for shape in args.shapes:
    b, v = (int(s) for s in shape.split("x"))
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (b, v))
    logits[:, :32] += 14
    logits = jnp.asarray(logits, jnp.float32)
    keys = jax.vmap(lambda i: jax.random.key_data(jax.random.key(i)))(jnp.arange(b))
    for name, (t, k, top_p) in KINDS.items():
      call = (logits, keys.astype(jnp.uint32), jnp.full((b,), t, jnp.float32),
              jnp.full((b,), k, jnp.int32), jnp.full((b,), top_p, jnp.float32))
      # a new function each time: jit would reuse a trace made under the other prefix
      ms = median_ms(jax.jit(lambda *a: sampling.sample(*a)), call, args.repeats)
      prefix = sampling.TRUNCATION_PREFIX
      try:  # the same call sorting the whole row, as before the prefix
        sampling.TRUNCATION_PREFIX = v
        sort_ms = median_ms(jax.jit(lambda *a: sampling.sample(*a)), call, args.repeats)
      finally:
        sampling.TRUNCATION_PREFIX = prefix
      rows.append({"rows": b, "vocab": v, "kind": name, "ms": ms, "full_sort_ms": sort_ms,
                   "speedup": sort_ms / ms})
      print(f"{b:>4} x {v:<7} {name:<14} {ms:9.2f} ms   whole-row sort {sort_ms:9.2f} ms   "
            f"{sort_ms / ms:6.1f}x", flush=True)
  write_result({"benchmark": "sampling", **run_info(), "device_kind": kind,
                "truncation_prefix": sampling.TRUNCATION_PREFIX, "rows": rows}, args.results,
               f"sampling_{jax.default_backend()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
