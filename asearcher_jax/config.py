"""Typed run configuration: YAML files under configs/, validated at load, with dotted overrides.

Each default lives once, in its section's class beside the package it configures
(`rl/config.py`, `models/config.py`, ...; all listed in docs/config.md); this module assembles
them into `Config` and loads files. A YAML file states what differs. A file may
`base:` another file (relative path), which it then overrides key by key.
Unknown keys are errors that name the key and the file, as are type errors.
Overrides on the command line look like `model.arch.num_layers=4` and take
YAML values (`mesh.fsdp=-1`, `model.path=null`, `optimizer.betas=[0.9,0.95]`).
"""

from __future__ import annotations

import difflib
import os
import typing
from typing import Any, Literal, Sequence

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from asearcher_jax.agent.config import AgentSection
from asearcher_jax.errors import ConfigError
from asearcher_jax.eval.config import EvalSection
from asearcher_jax.inference.config import ServeSection
from asearcher_jax.models.config import ModelSection
from asearcher_jax.reward.config import RewardSection
from asearcher_jax.rl.config import RLSection
from asearcher_jax.section import DType, Section, check_address
from asearcher_jax.synth.config import SynthSection
from asearcher_jax.tools.config import RetrievalSection, SearchClientSection, WebSection
from asearcher_jax.train.config import OptimizerSection
from asearcher_jax.world.config import WorldConfig


class MeshSection(Section):
  """Device mesh sizes; one axis may be -1 (all remaining devices)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self) -> dict[str, int]:
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


class CheckpointSection(Section):
  directory: str | None = None  # defaults to <run.output_dir>/checkpoints
  every_steps: int = Field(50, gt=0)
  max_to_keep: int | None = Field(3, ge=1)  # null: keep every step
  async_save: bool = True


class DistributedSection(Section):
  """jax.distributed, for a learner or SFT run that spans several processes (hosts).

  `auto` initialises when a coordinator is known (here, or $JAX_COORDINATOR_ADDRESS) or the
  process runs under a multi-process launcher (Cloud TPU pod, GKE TPU JobSet, SLURM, Open MPI);
  `on` always (JAX's own cluster detection fills what is unset); `off` never. Unset numbers fall
  back to $JAX_NUM_PROCESSES, $JAX_PROCESS_ID and $JAX_LOCAL_DEVICE_IDS.
  """

  mode: Literal["auto", "on", "off"] = "auto"
  coordinator_address: str | None = None  # host:port of process 0, which listens there only
  num_processes: int | None = Field(None, ge=1)
  process_id: int | None = Field(None, ge=0)
  local_device_ids: tuple[int, ...] | None = None  # GPUs: the devices this process drives
  initialization_timeout_s: int = Field(300, gt=0)
  heartbeat_timeout_s: int = Field(100, gt=0)
  cpu_collectives: Literal["gloo", "mpi"] = "gloo"  # CPU devices (tests, CPU clusters)

  @field_validator("mode", mode="before")
  @classmethod
  def _yaml_boolean(cls, v):  # YAML reads a bare on / off as true / false
    return ("on" if v else "off") if isinstance(v, bool) else v

  @model_validator(mode="after")
  def _check(self):
    if self.coordinator_address is not None:
      check_address(self.coordinator_address, "distributed.coordinator_address")
    if (self.num_processes is not None and self.process_id is not None
        and self.process_id >= self.num_processes):
      raise ValueError(f"distributed.process_id {self.process_id} must be below "
                       f"distributed.num_processes {self.num_processes}")
    return self


class PlacementSection(Section):
  """Where the learner and the decode servers run, and how a run's processes find each other.

  colocated: the learner and this host's decode servers share its accelerators, the learner
  taking `colocated_learner_share` of each one's memory and the decode servers the rest;
  disaggregated: separate devices (a split of this host's, given as device ids, or other hosts
  and slices, given as addresses). Rollout workers and decode servers on other hosts are found
  through `replay_address` and `decode_addresses`; anything off loopback needs a token
  (serve.token or $ASEARCHER_TOKEN). `num_devices`, `decode_num_devices`,
  `device_memory_gib` and `platform` let `asearcher plan` check a config before anything is
  launched.
  """

  mode: Literal["colocated", "disaggregated"] = "colocated"
  learner_devices: tuple[int, ...] | None = None  # this host's accelerator ids (null: all)
  decode_devices: tuple[int, ...] | None = None  # this host's ids for its decode servers
  decode_replica: int = Field(0, ge=0)  # which decode server of this host a `serve` process is
  memory_fraction: float = Field(0.9, gt=0, le=1)  # of a device's memory JAX may take
  colocated_learner_share: float = Field(0.6, gt=0, lt=1)
  decode_mesh: MeshSection | None = None  # one decode server's mesh (default: `mesh`)
  # served (and published) weights; null: the compute dtype on accelerators, param_dtype on CPU
  # (placement.serving_param_dtype)
  decode_param_dtype: DType | None = None
  replay_address: str | None = None  # host:port of the replay queue
  decode_addresses: tuple[str, ...] = ()  # decode servers the learner publishes to
  weights_dir: str | None = None  # shared by learner and decode hosts; <output_dir>/weights
  verify_weights: bool = True  # per-tensor content hashes, checked by every decode server
  num_devices: int | None = Field(None, ge=1)  # learner devices over all hosts (null: detect)
  decode_num_devices: int | None = Field(None, ge=1)  # devices of one decode server
  device_memory_gib: float | None = Field(None, gt=0)  # per device (null: detect)
  # The accelerator the config is written for, which `asearcher plan` resolves `auto`
  # attention and remat for wherever it runs (null: the machine it runs on).
  platform: Literal["cpu", "gpu", "tpu"] | None = None

  @model_validator(mode="after")
  def _check(self):
    if self.replay_address is not None:
      check_address(self.replay_address, "placement.replay_address")
    for a in self.decode_addresses:
      check_address(a, "placement.decode_addresses")
    for key in ("learner_devices", "decode_devices"):
      ids = getattr(self, key)
      if ids is not None and (not ids or len(set(ids)) != len(ids) or min(ids) < 0):
        raise ValueError(f"placement.{key}: expected distinct device ids >= 0, got {list(ids)}")
    if self.mode == "disaggregated" and self.learner_devices and self.decode_devices:
      shared = sorted(set(self.learner_devices) & set(self.decode_devices))
      if shared:
        raise ValueError(f"placement: disaggregated, but devices {shared} are in both "
                         "learner_devices and decode_devices")
    if (self.decode_devices and self.decode_num_devices
        and len(self.decode_devices) % self.decode_num_devices):
      raise ValueError(f"placement.decode_devices ({len(self.decode_devices)}) is not a "
                       f"multiple of decode_num_devices ({self.decode_num_devices})")
    return self


class RunSection(Section):
  name: str = "debug"
  output_dir: str = "runs/debug"


class Config(Section):
  model: ModelSection
  mesh: MeshSection = MeshSection()
  optimizer: OptimizerSection = OptimizerSection()
  checkpoint: CheckpointSection = CheckpointSection()
  serve: ServeSection = ServeSection()
  retrieval: RetrievalSection = RetrievalSection()
  web: WebSection = WebSection()
  search: SearchClientSection = SearchClientSection()
  world: WorldConfig = WorldConfig()
  agent: AgentSection = AgentSection()
  reward: RewardSection = RewardSection()
  eval: EvalSection = EvalSection()
  rl: RLSection = RLSection()
  synth: SynthSection = SynthSection()
  distributed: DistributedSection = DistributedSection()
  placement: PlacementSection = PlacementSection()
  run: RunSection = RunSection()

  @property
  def checkpoint_dir(self) -> str:
    return self.checkpoint.directory or os.path.join(self.run.output_dir, "checkpoints")


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
  path = os.path.abspath(path)
  if path in seen:
    raise ConfigError(f"{path}: 'base' chain loops back to itself")
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: config file not found")
  try:
    with open(path) as f:
      data = yaml.safe_load(f) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: malformed YAML ({e})") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
  base = data.pop("base", None)
  if base is None:
    return data
  parent = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
  return _merge(parent, data)


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies `a.b.c=value` strings (YAML-typed values) to a nested dict."""
  data = _merge({}, data)
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
      raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
      value = yaml.safe_load(raw)
    except yaml.YAMLError:
      raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
      if node.get(part) is None:
        node[part] = {}
      if not isinstance(node[part], dict):
        section = ".".join(parts[:depth + 1])
        raise ConfigError(f"override {item!r}: {section!r} is not a section")
      node = node[part]
    node[parts[-1]] = value
  return data


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
  """Loads and validates a config file (or defaults only) plus overrides."""
  data = _read_yaml(path) if path else {}
  data = apply_overrides(data, overrides)
  source = path or "<defaults>"
  try:
    return Config.model_validate(data)
  except ValidationError as e:
    raise ConfigError(f"{source}{' + overrides' if overrides else ''}: "
                      + "; ".join(_describe(err) for err in e.errors())) from None
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None


def _describe(err: dict) -> str:
  loc = ".".join(str(x) for x in err["loc"])
  if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
    close = difflib.get_close_matches(str(err["loc"][-1]), _keys_under(err["loc"][:-1]), n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown key '{loc}'{hint}"
  if err["type"] == "missing":
    return f"missing required key '{loc}'"
  return f"'{loc}': {err['msg']}" if loc else err["msg"]


def _keys_under(loc) -> list[str]:
  """The keys of the section at `loc` (a validation error's path), for suggestions."""
  fields: dict = Config.model_fields
  for part in loc:  # sections are models, model.arch a pydantic dataclass: both list fields
    field = fields.get(str(part))
    if field is None:
      return []
    options = typing.get_args(field.annotation) or (field.annotation,)
    fields = next((a.__pydantic_fields__ for a in options
                   if isinstance(getattr(a, "__pydantic_fields__", None), dict)), {})
  return list(fields)


def dump_config(cfg: Config) -> str:
  return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
