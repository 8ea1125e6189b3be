"""What every benchmark records beside its figures: when, on what, with which versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_info(packages: tuple[str, ...] = ("jax", "jaxlib", "flax"), device: bool = True) -> dict:
  """`device`: also the JAX device kind and backend the figures came from (it initialises JAX's
  backend, so benchmarks that never run JAX pass False)."""
  info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "python": platform.python_version(), "platform": platform.platform(),
          "cpu_cores": os.cpu_count(), "commit": _commit(), "versions": {}}
  if device:
    info.update(_device())
  for name in packages:
    try:
      info["versions"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return info


def _device() -> dict:
  """JAX's first device's kind and the backend; None each where no backend starts (the figures
  are still worth writing)."""
  import jax  # lazily: the benchmarks that pass device=False never load it

  try:
    return {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend()}
  except RuntimeError:
    return {"device_kind": None, "backend": None}


def _commit() -> str | None:
  """The checkout's commit, "+" when tracked files differ from it; None outside a git checkout."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           check=True, capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+" if dirty else "")


def write_result(result: dict, path: str | None, default_name: str) -> str:
  """Writes JSON to `path` (default: benchmarks/results/<default_name>.json) and says where."""
  path = path or os.path.join(RESULTS, default_name.replace(" ", "_") + ".json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"recorded {path}")
  return path


def device_figure(table: dict[str, float], device_kind: str) -> float | None:
  """A per-device figure (peak FLOP/s, HBM bandwidth) for a JAX device kind; longest name wins."""
  for name, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in device_kind.lower():
      return value
  return None
