"""benchmarks/device_profile.py: a program's profiled device time, split by what its ops do."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_profile


def _program():
  """A scanned layer (matmul, attention-scoped softmax, elementwise) and a sampling tail."""
  def layer(x, w):
    h = x @ w
    with jax.named_scope("attention"):
      h = jax.nn.softmax(h @ h.T, axis=-1) @ h
    return jnp.tanh(h) * 0.5 + x, None

  @jax.named_scope("sampling")
  def pick(logits):
    return jnp.argmax(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True), axis=-1)

  @jax.jit
  def f(x, ws, head):
    x, _ = jax.lax.scan(layer, x, ws)
    return pick(x @ head)

  args = (jnp.ones((64, 128)) / 128, jnp.asarray(np.random.RandomState(0).randn(3, 128, 128)),
          jnp.ones((128, 512)))
  return f, args


def test_ops_are_filed_by_scope_then_by_matmul():
  f, args = _program()
  text = f.lower(*args).compile().as_text()
  assert device_profile.module_name(text) == "jit_f"
  cats = device_profile.op_categories(text)
  ops = {}
  for line in text.splitlines():  # each instruction's opcode, read independently
    if " = " in line and line[:1].isspace():
      name = line.split("=")[0].split()[-1].lstrip("%")
      ops[name] = line
  assert set(cats) == set(ops)
  seen = set()
  for name, line in ops.items():
    scope = set(re.search(r'op_name="([^"]*)"', line).group(1).split("/")) \
        if "op_name=" in line else set()
    if " while(" in line:  # its own event spans its body's: it holds no time of its own
      assert cats[name] == "other"
    elif "attention" in scope:
      assert cats[name] == "attention", line
    elif "sampling" in scope:
      assert cats[name] == "sampling", line
    elif " dot(" in line:
      assert cats[name] == "matmul", line
    else:
      continue
    seen.add(cats[name])
  assert seen == {"matmul", "attention", "sampling", "other"}


def test_the_split_covers_the_programs_ops_once():
  """A loop's own event spans its body's ops: counting both would double the time."""
  f, args = _program()
  compiled = f.lower(*args).compile()
  jax.block_until_ready(f(*args))
  out = device_profile.op_split(lambda: [f(*args) for _ in range(5)][-1], compiled.as_text(), 5)
  assert out["calls"] == 5 and out["device_s_per_call"] > 0
  assert abs(sum(out["split"].values()) - 1) < 1e-3  # shares rounded to 1e-4 each
  assert out["split"]["matmul"] > 0 and out["split"]["attention"] > 0
  assert out["unmatched_ops"] == []
  assert not any(t["op"].startswith("while") for t in out["top_ops"])
  assert "matmul" in device_profile.describe(out)
