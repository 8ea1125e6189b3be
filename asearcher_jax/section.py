"""The base of every config section: frozen, and strict about unknown keys.

A leaf module, so that each package can keep its own section beside its code (`rl/config.py`,
`models/config.py`, ...) and `config.py` only assembles them; nothing here imports a package.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

DType = Literal["float32", "bfloat16", "float16"]

_ADDRESS = r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$"  # host:port (IPv6 in brackets)


class Section(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)


def check_address(value: str, key: str) -> str:
  if not re.match(_ADDRESS, value):
    raise ValueError(f"{key}: expected host:port, got {value!r}")
  return value
