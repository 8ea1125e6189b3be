"""The policy's parameters as a flat {"layers/wqkv": leaf} mapping, the one form checkpoints, weight
publication and weight swaps exchange; and back into an nnx State or model."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, traverse_util

from asearcher_jax.errors import CheckpointError
from asearcher_jax.sharding import state_shardings


def param_shardings(model, mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
  """Flat {"a/b": NamedSharding} for every parameter; raises if the mesh does not divide one."""
  return flat_state(state_shardings(nnx.state(model, nnx.Param), mesh))


def flatten(tree: dict) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def flat_state(state) -> dict[str, Any]:
  """{"layers/wqkv": leaf, ...}: an nnx State's leaves by path."""
  return flatten(nnx.to_pure_dict(state))


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
  """{"layers/wqkv": array, ...}: the model's parameters by path."""
  return flat_state(nnx.state(model, nnx.Param))


def with_params(model: nnx.Module, params: dict[str, Any]) -> nnx.Module:
  """Returns the model (abstract or concrete) with its parameters replaced by `params` (flat)."""
  state = nnx.state(model, nnx.Param)
  expected = set(flat_state(state))
  if set(params) != expected:
    missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
    raise CheckpointError(f"parameters do not match the model: missing {missing}, "
                          f"unexpected {extra}")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params, sep="/"))
  nnx.update(model, state)
  return model


def state_like(template, flat: dict[str, Any]):
  """A copy of `template` (an nnx State) with leaves from `flat` by path; template untouched."""
  state = jax.tree.map(lambda x: x, template)  # fresh Variables, same structure
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat, sep="/"))
  return state
