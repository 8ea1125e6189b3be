"""Where a compiled program's device time goes: matmul, attention, sampling or other.

`op_split` runs a program under `jax.profiler`, reads the profile's per-op events (the
`hlo_op` / `hlo_module` the XLA runtimes tag each executed op with, GPU kernels and CPU
thunks alike) and files each op under a category read from the program's optimized HLO:
- attention / sampling: the op, or an op fused into it, comes from code under
  `jax.named_scope("attention")` (models/qwen.py: attention with its KV cache reads and
  writes) or `jax.named_scope("sampling")` (inference/sampling.py);
- matmul: otherwise, the op is or contains a dot, a convolution or a GEMM custom call;
- other: the rest (norms, RoPE, casts, weight slices, optimizer updates, copies).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable

import jax

CATEGORIES = ("matmul", "attention", "sampling", "other")
_CONTROL = ("while", "conditional", "call")
SCOPES = ("attention", "sampling")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w\[])([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                    r"=%?([\w.\-]+)|\b(?:branch|called)_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_GEMM = re.compile(r"gemm|matmul|cublas|dot", re.IGNORECASE)


def module_name(hlo_text: str) -> str:
  """The HloModule's name, which the profiler tags its ops with."""
  m = re.search(r"HloModule\s+([\w.\-]+)", hlo_text)
  if not m:
    raise ValueError("not an HLO module's text")
  return m.group(1)


def op_categories(hlo_text: str) -> dict[str, str]:
  """{instruction name: category} for every instruction of an optimized HLO module."""
  return _parse(hlo_text)[0]


def _parse(hlo_text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
  """Categories, and {loop or call instruction: every instruction it runs, nested}."""
  comps: dict[str, list[tuple[str, str, str, list[str], str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    inst = _INSTRUCTION.match(line)
    if inst and current is not None:
      name, rest = inst.groups()
      op = _OPCODE.search(rest)
      calls = [c.strip().lstrip("%") for m in _CALLS.finditer(rest)
               for c in (m.group(1) or m.group(2)).split(",")]
      op_name = _OP_NAME.search(rest)
      target = _TARGET.search(rest)
      comps[current].append((name, op.group(1) if op else "", op_name.group(1) if op_name else "",
                             calls, target.group(1) if target else ""))
      continue
    comp = _COMPUTATION.match(line)
    if comp and not line[:1].isspace():  # headers start a line; instructions are indented
      current = comp.group(1)
      comps[current] = []

  seen: dict[str, tuple[set[str], bool]] = {}
  inside: dict[str, set[str]] = {}

  def names(comp: str, done: set[str]) -> set[str]:
    if comp in done:
      return set()
    done.add(comp)
    out = set()
    for name, _, _, calls, _ in comps.get(comp, []):
      out.add(name)
      for c in calls:
        out |= names(c, done)
    return out

  def contents(comp: str) -> tuple[set[str], bool]:
    """The scopes named in a computation (and what it calls), and whether it multiplies."""
    if comp not in seen:
      seen[comp] = (set(), False)  # cycles (a while's body calling itself) end here
      scopes, matmul = set(), False
      for _, op, op_name, calls, target in comps.get(comp, []):
        s, mm = _own(op, op_name, target)
        scopes |= s
        matmul |= mm
        for c in calls:
          cs, cm = contents(c)
          scopes |= cs
          matmul |= cm
      seen[comp] = (scopes, matmul)
    return seen[comp]

  out = {}
  for comp, insts in comps.items():
    for name, op, op_name, calls, target in insts:
      if op in _CONTROL:  # what a loop's own event holds is its ops' time, filed under them
        inside[name] = set().union(*(names(c, set()) for c in calls))
        out[name] = "other"
        continue
      scopes, matmul = _own(op, op_name, target)
      for c in calls:
        cs, cm = contents(c)
        scopes |= cs
        matmul |= cm
      out[name] = next((s for s in SCOPES if s in scopes), "matmul" if matmul else "other")
  return out, inside


def _own(op: str, op_name: str, target: str) -> tuple[set[str], bool]:
  parts = set(op_name.split("/"))
  return ({s for s in SCOPES if s in parts},
          op in ("dot", "convolution") or (op == "custom-call" and bool(_GEMM.search(target))))


def op_split(run: Callable[[], object], hlo_text: str, calls: int, top: int = 8) -> dict:
  """Runs `run` (which makes `calls` calls of the compiled program `hlo_text` describes) under
  the profiler; returns the program's device time per call (one device's, averaged over the
  devices that ran it) and its split by category."""
  module = module_name(hlo_text)
  categories, inside = _parse(hlo_text)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(run())
    [path] = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  # An accelerator's ops are its device processes' events (one process per device); a CPU's
  # run on host threads, in the one process there is.
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "/device:" in str((e.get("args") or {}).get("name", ""))}
  per_op: dict[str, float] = collections.defaultdict(float)
  ran_on = set()
  for e in events:
    args = e.get("args") or {}
    if (e.get("ph") == "X" and "hlo_op" in args and (not devices or e.get("pid") in devices)
        and _same_module(args.get("hlo_module", ""), module)):
      per_op[args["hlo_op"]] += e.get("dur", 0) * 1e-6  # microseconds
      ran_on.add(e.get("pid"))
  # A loop whose own ops were traced (CPU thunks) would count twice; one traced only as a
  # whole keeps its time, filed under "other".
  for loop, ops in inside.items():
    if loop in per_op and ops & per_op.keys():
      del per_op[loop]
  if not per_op:
    raise RuntimeError(f"the profile holds no op of {module}")
  n = len(ran_on)  # devices that ran it: the times below are one device's, on average
  per_op = {op: t / n for op, t in per_op.items()}
  total = sum(per_op.values())
  by = collections.Counter()
  for op, s in per_op.items():
    by[categories.get(op, "other")] += s
  return {
      "module": module, "calls": calls, "devices": n, "device_s_per_call": total / calls,
      "split": {c: round(by[c] / total, 4) for c in CATEGORIES},
      "unmatched_ops": sorted(op for op in per_op if op not in categories),
      "top_ops": [{"op": op, "category": categories.get(op, "other"), "s_per_call": s / calls}
                  for op, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]],
  }


def _same_module(tag: str, module: str) -> bool:
  """The profiler may add a suffix (an id, a fingerprint) to the module's name."""
  return tag == module or (tag.startswith(module) and not re.match(r"[\w]", tag[len(module)]))


def describe(split: dict) -> str:
  s = split["split"]
  return (f"device {split['device_s_per_call'] * 1e3:.2f} ms a call: "
          + ", ".join(f"{c} {100 * s[c]:.0f}%" for c in CATEGORIES))
