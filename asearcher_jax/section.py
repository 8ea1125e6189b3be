"""The base of every config section: frozen, and strict about unknown keys.

A leaf module, so that each package can keep its own section beside its code (`rl/config.py`,
`models/config.py`, ...) and `config.py` only assembles them; nothing here imports a package.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

DType = Literal["float32", "bfloat16", "float16"]

_ADDRESS = r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$"  # host:port (IPv6 in brackets)


class Section(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)

  @field_validator("*", mode="before")
  @classmethod
  def _no_yes_no_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
    """YAML 1.1 reads on/off/yes/no as booleans, which pydantic would take as 1/0 for a
    number: `serve.http_port: off` bound a random port, `checkpoint.max_to_keep: no` kept
    nothing. A field that is not a yes/no refuses them."""
    if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
      raise ValueError(f"takes no yes/no, got {value} (YAML reads on/off/yes/no as booleans; "
                       "give a number, or null)")
    return value


def _admits_bool(annotation) -> bool:
  if annotation is bool or annotation is Any:
    return True
  return any(_admits_bool(a) for a in typing.get_args(annotation) if not isinstance(a, str))


def check_address(value: str, key: str) -> str:
  if not re.match(_ADDRESS, value):
    raise ValueError(f"{key}: expected host:port, got {value!r}")
  return value
