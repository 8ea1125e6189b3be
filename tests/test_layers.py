"""The package's architecture, checked: each module sits in a layer and imports only from its own
layer or lower ones (docs/architecture.md), packages import each other without circles, and the
light side of the system (clients, the agent, config, rewards, the replay client) loads no JAX."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "asearcher_jax")

# Lowest first; a module takes the layer of its longest listed prefix. A package's config section
# and the decoder's wire types are leaves that every layer may read.
LAYERS = [
    ("infrastructure", ["errors", "jsonl", "manifest", "auth", "background", "procs", "lazy",
                        "section", "retry", "outdir"]),
    ("sections and wire types", [
        "agent.config", "eval.config", "inference.config", "models.config", "reward.config",
        "rl.config", "synth.config", "tools.config", "train.config", "world.config",
        "inference.protocol", "placement"]),
    ("devices and storage", ["sharding", "distributed", "checkpoint"]),
    ("model and data", ["models", "data"]),
    ("tools and rewards", ["tools", "reward"]),
    ("world", ["world"]),
    ("decoding", ["inference"]),
    ("agent", ["agent"]),
    ("replay, training, expert", ["replay", "train", "expert"]),
    ("evaluation, RL, synthesis", ["eval", "rl", "synth"]),
    ("run config and planning", ["config", "memory_plan"]),
    ("entry points", ["commands", "cli", "inference.server", "rl.launch", "rl.supervisor"]),
]


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    if "protos" in dirpath:
      continue
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__").removesuffix("__init__")] = os.path.join(dirpath, f)
  return out


def _layer(module: str) -> int:
  best, layer = -1, None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, layer = len(p), i
  assert layer is not None, f"asearcher_jax.{module} is in no layer of tests/test_layers.py"
  return layer


def _imports(module: str, path: str, modules) -> set[str]:
  """Modules of the package `module` imports anywhere (top level or inside functions), except
  under `if TYPE_CHECKING:`, which never runs (annotations may name a higher layer's types)."""
  tree = ast.parse(open(path).read())
  is_pkg = path.endswith("__init__.py")
  typing_only = {id(n) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
                 for stmt in node.body for n in ast.walk(stmt)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if module else []
        base = base if is_pkg else base[:-1]
        base = base[:len(base) - node.level + 1]
        stem = ".".join(base + ([node.module] if node.module else []))
        stem = "asearcher_jax" + ("." + stem if stem else "")
      else:
        stem = node.module or ""
      names = [f"{stem}.{a.name}" for a in node.names] + [stem]
    else:
      continue
    for name in names:
      if name == "asearcher_jax" or not name.startswith("asearcher_jax."):
        continue
      name = name.removeprefix("asearcher_jax.")
      while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
      if name in modules and name != module and "protos" not in name:
        found.add(name)
  return found


def _graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items() if m}


def test_no_module_imports_from_a_higher_layer():
  upward = []
  for m, deps in _graph().items():
    for d in deps:
      if _layer(d) > _layer(m):
        upward.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
  assert not upward, "\n".join(sorted(upward))


def _package(module: str) -> str:
  return module.split(".")[0]


def test_packages_import_each_other_without_circles():
  edges: dict[str, set[str]] = {}
  for m, deps in _graph().items():
    for d in deps:
      if _package(d) != _package(m) and not (_layer(d) <= 1):  # leaves are everyone's
        edges.setdefault(_package(m), set()).add(_package(d))
  seen, stack, circles = set(), [], []

  def visit(p):
    if p in stack:
      circles.append(" -> ".join(stack[stack.index(p):] + [p]))
      return
    if p in seen:
      return
    seen.add(p)
    stack.append(p)
    for q in sorted(edges.get(p, ())):
      visit(q)
    stack.pop()

  for p in sorted(edges):
    visit(p)
  assert not circles, "\n".join(circles)


def test_checker_sees_an_upward_import(tmp_path):
  """The layer check can fail: a lower module importing a higher one is caught."""
  src = tmp_path / "x.py"
  src.write_text("def f():\n  from asearcher_jax.rl.learner import Learner\n")
  found = _imports("models.x", str(src), _modules())
  assert "rl.learner" in found and _layer("rl.learner") > _layer("models.x")


LIGHT = ["asearcher_jax.config", "asearcher_jax.agent", "asearcher_jax.replay.client",
         "asearcher_jax.reward", "asearcher_jax.inference.client", "asearcher_jax.inference",
         "asearcher_jax.models.tokenizer", "asearcher_jax.rl.rollout", "asearcher_jax.eval",
         "asearcher_jax.tools.client", "asearcher_jax.data", "asearcher_jax.synth"]
HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow_datasets", "bm25s")


@pytest.mark.parametrize("module", LIGHT)
def test_light_side_loads_no_jax(module):
  """A CPU-only rollout worker, an evaluation client or a config loader pays for no JAX: each is
  imported (and a config loaded) in a fresh interpreter."""
  code = (f"import sys, {module}\n"
          "from asearcher_jax.config import load_config\n"
          "load_config(sys.argv[1], ['rl.total_steps=3'])\n"
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
  cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "debug.yaml")
  out = subprocess.run([sys.executable, "-c", code, cfg], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", f"{module} loads {out.stdout.strip()}"
