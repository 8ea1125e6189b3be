"""YAML configs: validation with named errors, dotted overrides, base files, shipped configs."""

import glob
import os

import pytest

from asearcher_jax.config import apply_overrides, load_config
from asearcher_jax.errors import ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..")
ARCH = """
model:
  arch: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_layers: 2,
         num_heads: 4, num_kv_heads: 2}
"""


def write(tmp_path, text, name="c.yaml"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                            recursive=True)))
def test_shipped_configs_validate(path):
  cfg = load_config(path)
  assert cfg.model.arch is not None or cfg.model.path is not None


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
  cfg = load_config(write(tmp_path, ARCH))
  assert cfg.mesh.fsdp == -1 and cfg.optimizer.grad_clip == 1.0
  assert cfg.model.arch.head_dim == 8  # derived: hidden_size / num_heads
  assert cfg.model.arch.qkv_bias is False  # qwen3 default


def test_unknown_key_names_key_and_file(tmp_path):
  path = write(tmp_path, ARCH + "mesh:\n  fsdp: 2\n  pipeline: 4\n")
  with pytest.raises(ConfigError, match=rf"{path}: unknown key 'mesh.pipeline'"):
    load_config(path)


def test_unknown_key_inside_model_architecture(tmp_path):
  path = write(tmp_path, ARCH.replace("num_layers: 2", "num_layers: 2, num_layer: 3"))
  with pytest.raises(ConfigError, match=r"unknown key 'model.arch.num_layer' \(did you mean "
                                       r"'num_layers'"):
    load_config(path)


def test_type_error_names_key(tmp_path):
  path = write(tmp_path, ARCH + "optimizer:\n  learning_rate: fast\n")
  with pytest.raises(ConfigError, match=r"'optimizer.learning_rate': Input should be a valid"):
    load_config(path)


def test_model_needs_exactly_one_source(tmp_path):
  with pytest.raises(ConfigError, match="exactly one of model.path"):
    load_config(write(tmp_path, ARCH + "  path: /some/dir\n"))


def test_dotted_overrides_take_yaml_values(tmp_path):
  cfg = load_config(write(tmp_path, ARCH), [
      "model.arch.num_layers=4", "mesh.tensor=2", "mesh.fsdp=-1", "optimizer.betas=[0.9,0.95]",
      "model.dtype=float32", "optimizer.grad_clip=null"])
  assert cfg.model.arch.num_layers == 4 and cfg.mesh.tensor == 2
  assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.grad_clip is None


def test_bad_overrides_are_refused(tmp_path):
  path = write(tmp_path, ARCH)
  with pytest.raises(ConfigError, match="expected dotted.key=value"):
    load_config(path, ["mesh.tensor"])
  with pytest.raises(ConfigError, match=r"overrides: unknown key 'mesh.tensr' \(did you mean "
                                       r"'tensor'\?\)"):
    load_config(path, ["mesh.tensr=2"])
  with pytest.raises(ConfigError, match="'model.arch' is not a section"):
    apply_overrides({"model": {"arch": 3}}, ["model.arch.num_layers=2"])


def test_yaml_yes_and_no_are_refused_where_a_number_is_wanted(tmp_path):
  """YAML 1.1 reads on/off/yes/no as booleans, which pydantic took as 1/0: `http_port: off`
  bound a random port and `max_to_keep: no` kept no checkpoint at all."""
  path = write(tmp_path, ARCH)
  for override in ("serve.http_port=off", "checkpoint.max_to_keep=no", "mesh.fsdp=on",
                   "rl.max_token_staleness=off"):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}': Value error, takes no yes/no"):
      load_config(path, [override])
  cfg = load_config(path, ["serve.warmup=yes", "serve.http_port=null",
                           "checkpoint.max_to_keep=null"])
  assert cfg.serve.warmup is True and cfg.serve.http_port is None
  with pytest.raises(ConfigError, match="'checkpoint.max_to_keep': Input should be greater"):
    load_config(path, ["checkpoint.max_to_keep=0"])  # orbax then pruned every step


def test_base_file_is_overridden_key_by_key(tmp_path):
  write(tmp_path, ARCH + "run:\n  name: base\n", name="base.yaml")
  child = write(tmp_path, "base: base.yaml\nmodel:\n  arch:\n    num_layers: 6\n")
  cfg = load_config(child)
  assert cfg.model.arch.num_layers == 6 and cfg.model.arch.hidden_size == 32
  assert cfg.run.name == "base"


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(str(tmp_path / "none.yaml"))
  with pytest.raises(ConfigError, match="malformed YAML"):
    load_config(write(tmp_path, "model: [unclosed\n"))
  with pytest.raises(ConfigError, match="top level must be a mapping"):
    load_config(write(tmp_path, "- a\n- b\n"))


def test_decay_over_the_whole_run():
  """decay_steps: -1 decays over the run's length, which the trainer passes in (SFT's epochs,
  RL's total steps); a run that cannot say its length is told to give a number."""
  from asearcher_jax.train.config import OptimizerSection
  from asearcher_jax.train.optimizer import learning_rate_schedule
  cfg = OptimizerSection(learning_rate=1.0, warmup_steps=2, decay_steps=-1, min_lr_ratio=0.1)
  lr = learning_rate_schedule(cfg, total_steps=10)
  assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(1.0)
  assert float(lr(6)) == pytest.approx(0.55)  # half way down the cosine from 1 to 0.1
  assert float(lr(10)) == pytest.approx(0.1)
  with pytest.raises(ConfigError, match="decay_steps=-1"):
    learning_rate_schedule(cfg)
  with pytest.raises(Exception, match="decay_steps"):
    OptimizerSection(decay_steps=-2)


def test_warmup_stable_decay():
  """schedule: wsd holds the peak until the last wsd_decay_fraction of the run, then falls
  linearly to min_lr_ratio (the debug run's SFT: a constant rate's speed with an annealed end)."""
  from asearcher_jax.train.config import OptimizerSection
  from asearcher_jax.train.optimizer import learning_rate_schedule
  cfg = OptimizerSection(learning_rate=1.0, warmup_steps=2, decay_steps=-1, min_lr_ratio=0.1,
                         schedule="wsd", wsd_decay_fraction=0.2)
  lr = [float(learning_rate_schedule(cfg, total_steps=20)(k)) for k in range(21)]
  assert lr[0] == 0.0 and lr[1] == pytest.approx(0.5)  # warmup as before
  assert lr[2:17] == pytest.approx([1.0] * 15)  # stable until step 20 - 0.2 * 20
  assert lr[16:21] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])  # linear to the floor
  # no warmup, and a decay longer than what follows warmup is cut to fit
  cfg = OptimizerSection(learning_rate=2.0, decay_steps=10, schedule="wsd", wsd_decay_fraction=1.0)
  assert [float(learning_rate_schedule(cfg)(k)) for k in (0, 5, 10)] == pytest.approx(
      [2.0, 1.0, 0.0])
  with pytest.raises(Exception, match="wsd_decay_fraction"):
    OptimizerSection(wsd_decay_fraction=0.0)


def test_rl_schedule_spans_every_update():
  """An RL run's whole-run schedule counts its optimizer updates, ppo_n_minibatches a step: it
  ends at the last update, not a 1/n of the way through the run."""
  from asearcher_jax.train.optimizer import learning_rate_schedule
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), [
      "optimizer.learning_rate=1.0", "optimizer.warmup_steps=0", "optimizer.decay_steps=-1",
      "optimizer.schedule=cosine", "rl.total_steps=10", "rl.ppo_n_minibatches=4"])
  assert cfg.rl.total_updates == 40
  lr = learning_rate_schedule(cfg.optimizer, cfg.rl.total_updates)
  assert float(lr(10)) > 0.8  # a quarter of the way: still near the peak
  assert float(lr(20)) == pytest.approx(0.5)  # half way down the cosine
  assert float(lr(40)) == pytest.approx(0.0)


def test_a_group_of_one_with_the_equal_reward_filter_is_refused():
  """Every group of one scores alike: the filter dropped them all and the learner waited."""
  with pytest.raises(ConfigError, match="group_size 1 with rl.filter_equal_rewards"):
    load_config(os.path.join(ROOT, "configs", "debug.yaml"), ["rl.group_size=1"])
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"),
                    ["rl.group_size=1", "rl.filter_equal_rewards=false"])
  assert cfg.rl.group_size == 1
