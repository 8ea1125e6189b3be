"""The one check of a directory that a command writes whole (an HF export, a policy
checkpoint, a world, SFT's output), made before any work: a file is refused, and so is a
directory that is not empty unless `overwrite`. With `overwrite`, only what such a command
writes is replaced (a directory holding one of its `markers`), and never the directory the
command runs in: `--out . --overwrite` once emptied the directory it was run in, and `--out ~
--overwrite` would have deleted a home."""

from __future__ import annotations

import glob
import os
import shutil

from asearcher_jax.errors import ConfigError

HF_MARKERS = ("config.json",)
WORLD_MARKERS = ("world.json",)
POLICY_MARKERS = ("tokenizer", "[0-9]*/_CHECKPOINT_METADATA")


def check_out_dir(path: str, *, overwrite: bool, markers: tuple[str, ...], what: str,
                  flag: str = "--out") -> None:
  """Raises ConfigError where writing `what` to `path` would destroy something else."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag} {path} is a file, not a directory")
  if not os.path.isdir(path) or not os.listdir(path):
    return
  if not overwrite:
    raise ConfigError(f"{flag} {path} exists and is not empty (use --overwrite to replace it)")
  if not any(glob.glob(os.path.join(glob.escape(path), m)) for m in markers):
    raise ConfigError(f"{flag} {path} holds files but no {what}: not overwritten; give a new "
                      "or an empty directory")
  real, cwd = os.path.realpath(path), os.getcwd()
  if cwd == real or cwd.startswith(real + os.sep):
    raise ConfigError(f"{flag} {path} is the directory this runs in, or holds it: not "
                      "overwritten")


def replace_dir(new: str, out: str) -> None:
  """Moves the finished directory `new` (a sibling of `out`) to `out`. What `out` held is
  moved aside first, put back if the move fails, and deleted only once the new one is in
  place: at no moment is there neither."""
  old = None
  if os.path.lexists(out):
    old = f"{new}.old"
    os.rename(out, old)
  try:
    os.rename(new, out)
  except OSError:
    if old is not None:
      os.rename(old, out)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
