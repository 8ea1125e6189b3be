"""Training-state checkpoints with orbax: params, optimizer state, step, version, metadata.

Saves are asynchronous (training continues while arrays stream to disk) and
atomic (orbax writes a temporary directory and renames it when complete), so a
crash mid-save leaves the previous step as the latest. Restores take target
shardings, so a checkpoint written on one mesh loads onto any other.

It knows nothing of the model: a *policy checkpoint* (one that also records the HF
`model_config` and carries a `tokenizer/` folder, which `from_pretrained` and `asearcher convert`
read like an HF directory) is written and read by `models/pretrained.py` on top of it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from asearcher_jax.errors import CheckpointError


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the given shardings: restore targets that allocate nothing."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """A directory of numbered steps, each holding `params`, optionally `opt_state`, and `meta`."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory}: no such checkpoint directory")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    if not read_only:
      self._drop_damaged()

  def _drop_damaged(self) -> None:
    """Removes the steps that cannot be restored: they would block a save of the same step
    (orbax: StepAlreadyExistsError, at every restart of a learner that reaches it again) and
    take places `max_to_keep` keeps for whole ones."""
    from asearcher_jax import distributed
    damaged = [s for s in self._mngr.all_steps() if not self._whole(s)]
    if not damaged:
      return
    if distributed.is_primary():
      for s in damaged:
        shutil.rmtree(os.path.join(self.directory, str(s)), ignore_errors=True)
    distributed.barrier(f"checkpoint-drop-{damaged[-1]}")
    self._mngr.reload()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """The steps that can be restored, oldest first. A step that a killed deletion (or a disk
    fault) left without one of its items is not listed, so a resume falls back to the one
    before it instead of failing on it."""
    return sorted(s for s in self._mngr.all_steps() if self._whole(s))

  def _whole(self, step: int) -> bool:
    d = os.path.join(self.directory, str(step))
    try:
      with open(os.path.join(d, "_CHECKPOINT_METADATA")) as f:
        items = json.load(f)["item_handlers"]
    except (OSError, ValueError, KeyError, TypeError):
      # A local step without readable metadata is damaged (every orbax this project pins
      # writes it; a deletion killed half-way may remove it first). A step that is not a local
      # directory (a bucket) is orbax's to judge.
      return not os.path.isdir(d)
    return bool(items) and all(os.path.isdir(os.path.join(d, k)) and os.listdir(
        os.path.join(d, k)) for k in items) and os.path.exists(os.path.join(d, "params",
                                                                            "_METADATA"))

  def save(self, step: int, *, params: dict[str, jax.Array], opt_state=None, version: int = 0,
           metadata: dict[str, Any] | None = None,
           manifest: dict[str, Any] | None = None) -> None:
    """Starts saving `step` (flat "a/b" params); returns before the arrays are on disk.

    With several processes every one must call it: each writes the shards it holds, process
    0 the metadata, and the step appears (atomically) once all have finished. `manifest`
    (asearcher_jax.manifest) travels in the same step, so it is never out of step with it.
    """
    meta = {"step": int(step), "version": int(version), "metadata": metadata or {}}
    items = {"params": ocp.args.StandardSave(traverse_util.unflatten_dict(params, sep="/")),
             "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if manifest is not None:
      items["manifest"] = ocp.args.JsonSave(manifest)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def _step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"{self.directory}: no complete checkpoint step")
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"{self.directory}: no step {step} (have {sorted(steps)})")
    return step

  def restore(self, step: int | None = None, *, params_target: dict[str, Any],
              opt_state_target=None) -> dict[str, Any]:
    """Restores into targets of ShapeDtypeStructs with shardings (the mesh may differ from save).

    Returns {"params" (flat), "opt_state" (if a target is given), "step", "version", "metadata"}.
    """
    step = self._step(step)
    items = {"params": ocp.args.StandardRestore(
        traverse_util.unflatten_dict(params_target, sep="/")), "meta": ocp.args.JsonRestore()}
    if opt_state_target is not None:
      items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{self.directory} step {step}: cannot restore ({e})") from None
    restored = {"params": traverse_util.flatten_dict(dict(out["params"]), sep="/"),
                "step": out["meta"]["step"], "version": out["meta"]["version"],
                "metadata": out["meta"]["metadata"]}
    if opt_state_target is not None:
      restored["opt_state"] = out["opt_state"]
    return restored

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._step(step)
    return dict(self._mngr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def read_manifest(self, step: int | None = None) -> dict[str, Any] | None:
    """The step's weight manifest, or None if it was saved without one."""
    step = self._step(step)
    if not os.path.isdir(os.path.join(self.directory, str(step), "manifest")):
      return None
    return dict(self._mngr.restore(
        step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))["manifest"])

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is committed."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
