"""Package faces that import their heavy modules on first use (PEP 562).

A package mixing light modules (config sections, wire types, clients) with heavy ones (JAX,
gRPC services, TFDS) names its heavy exports here, so that importing a light module, which runs
the package's `__init__`, never pays for the heavy ones. One mechanism for every package, in the
manner of scientific-python's `lazy_loader.attach`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def attach(package: str, names: dict[str, str]) -> tuple[Callable, Callable]:
  """`__getattr__` and `__dir__` for `package`, resolving each of `names` (export -> submodule)
  on first access and caching it on the package."""

  def __getattr__(name: str):
    sub = names.get(name)
    if sub is None:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{sub}"), name)
    setattr(sys.modules[package], name, value)
    return value

  def __dir__() -> list[str]:
    return sorted(set(vars(sys.modules[package])) | set(names))

  return __getattr__, __dir__
