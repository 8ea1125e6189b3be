"""Several JAX processes on this machine, joined by jax.distributed over loopback (gloo): the
real `asearcher learn` as a 2-process learner, then resumed as a 3-process one on another mesh.
Each step equals the single-process result; every process writes its own checkpoint shards and
the checkpoints restore (across process counts and meshes); the weights it publishes reach a
decode server in another process (this one) intact, checked against per-chunk hashes. Also:
the hash manifest across layouts and its refusals, and how a process decides to join a run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np
import pytest
import yaml
from conftest import child_env, single_device_mesh
from flax import nnx

from asearcher_jax import manifest as weight_manifest
from asearcher_jax.agent import Trajectory
from asearcher_jax.checkpoint import Checkpointer, abstract_like
from asearcher_jax.config import DistributedSection, load_config
from asearcher_jax.distributed import resolve
from asearcher_jax.errors import CheckpointError, ConfigError
from asearcher_jax.inference import Driver, Engine
from asearcher_jax.inference.server import DecodeServer
from asearcher_jax.inference.weights import load_weights
from asearcher_jax.models import build_tokenizer, create_model
from asearcher_jax.models.params import flat_state
from asearcher_jax.models.pretrained import save_policy
from asearcher_jax.procs import free_port
from asearcher_jax.replay import Group, ReplayQueue, ReplayServer
from asearcher_jax.rl.batch import build_batch, shard_batch
from asearcher_jax.rl.step import make_ppo_step
from asearcher_jax.sharding import make_mesh
from asearcher_jax.train.optimizer import make_optimizer

pytestmark = pytest.mark.e2e

ARCH = {"family": "qwen3", "vocab_size": 64, "hidden_size": 48, "intermediate_size": 96,
        "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
        "rope_theta": 10000.0, "tie_embeddings": False}
STEPS = 2


def groups(n: int) -> list[Group]:
  """n groups of two episodes, rewards 0 and 1, every token a valid id of the tiny vocabulary."""
  rng = np.random.default_rng(7)
  out = []
  for i in range(n):
    trajs = []
    for j in range(2):
      k = int(rng.integers(14, 30))
      t = Trajectory(qid=f"q{i}", question="?", answers=["a"], group_id=f"g{i}", sample=j)
      t.tokens = rng.integers(0, ARCH["vocab_size"], k).astype(np.int32)
      t.loss_mask = np.arange(k) >= k // 3
      t.behav_logp = np.where(t.loss_mask, rng.uniform(-4, -1, k), 0.0).astype(np.float32)
      t.version = np.where(t.loss_mask, 0, -1).astype(np.int32)
      t.seq_starts = [0]
      t.reward = float(j)
      t.status = "answered"
      trajs.append(t.to_record())
    out.append(Group(group_id=f"g{i}", qid=f"q{i}", submit_version=0, worker="test",
                     cursor=i + 1, trajectories=trajs))
  return out


def learners(n: int, config: str, replay: str, decode: str, *args: str, timeout: float = 300,
             during: Callable[[list[subprocess.Popen]], None] | None = None,
             succeed: bool = True):
  """`asearcher learn` as n processes of one jax.distributed run, 2 CPU devices each;
  `during(procs)` runs while they do. Their outputs; with `succeed=False`, (exit status,
  output) of each, whatever they are."""
  port = free_port()
  env = child_env("--xla_force_host_platform_device_count=2")
  procs = []
  try:
    for i in range(n):
      argv = [sys.executable, "-m", "asearcher_jax.cli", "learn", "--config", config,
              f"distributed.coordinator_address=127.0.0.1:{port}",
              f"distributed.num_processes={n}", f"distributed.process_id={i}", *args,
              "--replay", replay, "--decode", decode]
      procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    if during is not None:
      during(procs)
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if not succeed:
    return [(p.returncode, out) for p, out in zip(procs, outs)]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} of {n} failed:\n{out[-4000:]}"
  return outs


def tiny_run(tmp_path, **sections):
  """The initial policy, as an orbax policy checkpoint every learner process restores its
  shards of, and a learner config for it (`sections` update its sections); returns the
  config's path and the initial model (for the single-process reference)."""
  arch = load_config(None, [f"model.arch={json.dumps(ARCH)}"]).model.arch
  initial = create_model(arch, single_device_mesh(), seed=0, dtype="float32",
                         attention_impl="xla")
  build_tokenizer().save(str(tmp_path / "tokenizer"))
  save_policy(str(tmp_path / "init"), 0, flat_state(nnx.state(initial, nnx.Param)), arch,
              tokenizer_dir=str(tmp_path / "tokenizer"))
  config = {
      "model": {"path": str(tmp_path / "init"), "dtype": "float32", "attention": "xla"},
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
      "optimizer": {"learning_rate": 1e-2, "weight_decay": 0.0},
      "checkpoint": {"every_steps": 1, "async_save": False, "max_to_keep": None},
      "rl": {"group_size": 2, "batch_groups": 1, "row_tokens": 32, "micro_batch_rows": 12,
             "max_head_offpolicyness": 100, "adv_batch_norm": False, "total_steps": 1,
             "lease_timeout_s": 60},
      "run": {"output_dir": str(tmp_path / "run")}}
  for name, values in sections.items():
    config[name].update(values)
  (tmp_path / "mh.yaml").write_text(yaml.safe_dump(config))
  return str(tmp_path / "mh.yaml"), initial


@contextlib.contextmanager
def services(queue: ReplayQueue):
  """A replay server over `queue` and a decode server in this process (serving a model that
  is not the learner's); yields the decode driver and both servers."""
  arch = load_config(None, [f"model.arch={json.dumps(ARCH)}"]).model.arch
  mesh = single_device_mesh()
  served = create_model(arch, mesh, seed=99, dtype="float32")
  driver = Driver(Engine(served, slots=2, max_len=32, mesh=mesh), version=0)
  decode = DecodeServer(driver, grpc_port=0, http_port=None).start_in_thread()
  replay = ReplayServer(queue).start_in_thread()
  try:
    yield driver, replay, decode
  finally:
    replay.stop_thread()
    decode.stop_thread()


def reference(cfg, model, lineage):
  """The same steps in this one process on one device: [(params, opt_state, metrics)]."""
  mesh = single_device_mesh()
  params, opt_state, step = make_ppo_step(model, make_optimizer(cfg.optimizer), cfg.rl)
  out = []
  for group, version, rl in lineage:
    trajs = [Trajectory.from_record(b) for b in group.trajectories]
    batch, _ = build_batch([trajs], rl, learner_version=version)
    params, opt_state, metrics = step(params, opt_state, shard_batch(batch, mesh))
    out.append(({k: np.asarray(v) for k, v in flat_state(params).items()},
                jax.tree.map(np.asarray, opt_state), jax.device_get(metrics)))
  return out


def assert_close(got: dict, want: dict, what: str, atol: float = 1e-4):
  """Sums over another device layout round differently, and Adam turns that noise, in a
  gradient near zero, into a visible update: 1e-4 is still 100x below one step (lr 1e-2)."""
  assert got.keys() == want.keys(), what
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=atol,
                               err_msg=f"{what}: {k}")


def restore(directory: str, step: int, like_params: dict, like_opt):
  mesh = single_device_mesh()
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with Checkpointer(directory, read_only=True) as ck:
    return ck.restore(step, params_target=abstract_like(like_params, {k: shard for k in
                                                                      like_params}),
                      opt_state_target=jax.tree.map(
                          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard),
                          like_opt))


def process_bytes(step_dir: str) -> dict[str, int]:
  """Bytes of array data each process wrote into an orbax step (ocdbt.process_<i>)."""
  out = {}
  for name in os.listdir(os.path.join(step_dir, "params")):
    if name.startswith("ocdbt.process_"):
      root = os.path.join(step_dir, "params", name)
      out[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root)
                      for f in fs)
  return out


def test_two_then_three_process_learner_trains_checkpoints_and_publishes(tmp_path):
  run = tmp_path / "run"
  config, initial = tiny_run(tmp_path)
  cfg = load_config(config)
  queue = ReplayQueue()
  gs = groups(STEPS)
  for g in gs:
    assert queue.put(g) == "accepted"
  with services(queue) as (driver, replay, decode):
    outs2 = learners(2, config, replay.address, decode.grpc_address)
    served_1 = {k: np.asarray(v) for k, v in flat_state(driver.engine.params).items()}
    version_1 = driver.version
    outs3 = learners(3, config, replay.address, decode.grpc_address,
                     f"rl.total_steps={STEPS}", "--resume")
    served_2 = {k: np.asarray(v) for k, v in flat_state(driver.engine.params).items()}
    version_2 = driver.version

  # The same two steps in one process, at the learner's versions: 0, then 2 (the resumed
  # learner republishes its restored version 1 as 2 before training).
  ref = reference(cfg, initial, [(gs[0], 0, cfg.rl), (gs[1], 2, cfg.rl)])

  # Only process 0 talks and writes metrics; each step's loss is the single-process one
  assert "learner finished" in outs2[0] and "learner finished" not in outs2[1]
  assert "process 0 of 2" in outs2[0] and "resumed from step 1" in outs3[0]
  with open(run / "metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  assert [(m["step"], m["groups"]) for m in metrics] == [(1, ["g0"]), (2, ["g1"])]
  for m, (_, _, want) in zip(metrics, ref):
    np.testing.assert_allclose(m["loss"], float(want["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["grad_norm"], float(want["grad_norm"]), rtol=1e-4)
  stats = queue.stats()  # every group trained once and acknowledged: nothing leased or left
  assert (stats["version"], stats["consumed"], stats["queued"], stats["leases"]) == (3, 2, 0, 0)

  # Checkpoints: every process wrote its own shards; each step restores, here on one device,
  # to the reference (step 1 was also restored by the 3-process learner to train step 2)
  ckpt = run / "checkpoints"
  for step, procs in ((1, 2), (2, 3)):
    written = process_bytes(str(ckpt / str(step)))
    assert sorted(written) == [f"ocdbt.process_{i}" for i in range(procs)], written
    assert all(b > 0 for b in written.values()), written
    params, opt, _ = ref[step - 1]
    out = restore(str(ckpt), step, params, opt)
    assert out["step"] == step
    assert_close(out["params"], params, f"checkpoint step {step}")
    for a, b in zip(jax.tree.leaves(out["opt_state"]), jax.tree.leaves(opt)):
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6)  # moments: no Adam

  # Weights reached the decode server in this process intact: what it serves is the learner's
  # step, and matches every chunk hash the learner's processes wrote beside it
  assert (version_1, version_2) == (1, 3)
  assert_close(served_1, ref[0][0], "served after the 2-process run")
  assert_close(served_2, ref[1][0], "served after the 3-process run")
  weights = run / "weights"
  with Checkpointer(str(weights), read_only=True) as ck:
    man = ck.read_manifest(3)
  assert len(man["tensors"]["layers/w_gate_up"]["chunks"]) == 6  # fsdp 6: six chunks, six hashes
  assert weight_manifest.verify(served_2, man) == sum(
      len(t["chunks"]) for t in man["tensors"].values())
  assert sorted(process_bytes(str(weights / "3"))) == [f"ocdbt.process_{i}" for i in range(3)]


def test_sigterm_to_process_0_stops_every_process_after_one_final_checkpoint(tmp_path):
  """`launch/tpu_pod.sh stop` and scancel send SIGTERM to every learner process, and only
  process 0 acts on it. It used to leave its loop before its next lease's broadcast (the
  others waited in it for ever) and save its final checkpoint, a collective, alone."""
  run = tmp_path / "run"
  config, _ = tiny_run(tmp_path, checkpoint={"every_steps": 1000},  # the final save only
                       rl={"total_steps": 1000})
  queue = ReplayQueue()
  for g in groups(40):
    assert queue.put(g) == "accepted"

  def stop_after_the_first_step(procs):
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.1)
    for p in procs:  # as tpu_pod.sh stop does
      p.send_signal(signal.SIGTERM)

  with services(queue) as (_, replay, decode):
    outs = learners(2, config, replay.address, decode.grpc_address, timeout=60,
                    during=stop_after_the_first_step)
  assert "checkpoints and stops" in outs[0] and "learner finished" in outs[0]
  with open(run / "metrics.jsonl") as f:
    trained = len(f.readlines())
  assert 1 <= trained < 40
  # every process saved its shards of the last step trained, and its leases were acknowledged
  assert sorted(process_bytes(str(run / "checkpoints" / str(trained)))) == [
      "ocdbt.process_0", "ocdbt.process_1"]
  stats = queue.stats()
  assert (stats["consumed"], stats["leases"], stats["queued"]) == (trained, 0, 40 - trained)


def test_a_failure_of_process_0_stops_every_process(tmp_path):
  """Process 0 alone talks to the replay queue. When a call of its failed (the queue gone), it
  raised while the others waited in the next broadcast, for ever; now every process stops,
  with process 0's error, and none saves a checkpoint alone."""
  run = tmp_path / "run"
  config, _ = tiny_run(tmp_path, checkpoint={"every_steps": 1000}, rl={"total_steps": 1000})
  queue = ReplayQueue()
  for g in groups(40):
    assert queue.put(g) == "accepted"

  with services(queue) as (_, replay, decode):
    def drop_the_queue_after_the_first_step(procs):
      deadline = time.monotonic() + 240
      while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
      replay.stop_thread()

    ended = learners(2, config, replay.address, decode.grpc_address, timeout=90,
                     during=drop_the_queue_after_the_first_step, succeed=False)
  (status_0, out_0), (status_1, out_1) = ended
  assert status_0 != 0 and "replay queue at" in out_0 and "unavailable" in out_0, out_0[-3000:]
  assert status_1 != 0 and "process 0 failed" in out_1, out_1[-3000:]
  assert not (run / "checkpoints").exists() or not os.listdir(run / "checkpoints")


def test_manifest_chunks_follow_the_writer_and_verify_under_any_layout():
  arch = dict(ARCH, num_heads=4, num_kv_heads=2)
  cfg = load_config(None, [f"model.arch={json.dumps(arch)}"]).model.arch
  wide = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})  # 8 devices
  model = create_model(cfg, wide, seed=3, dtype="float32")
  flat = flat_state(nnx.state(model, nnx.Param))
  man = weight_manifest.build(flat)
  assert len(man["tensors"]["layers/w_gate_up"]["chunks"]) == 8  # embed/4 x mlp/2
  assert len(man["tensors"]["layers/attn_norm"]["chunks"]) == 1  # replicated: hashed once
  host = {k: np.asarray(v) for k, v in flat.items()}
  assert weight_manifest.verify(host, man) == sum(len(t["chunks"])
                                                  for t in man["tensors"].values())
  other = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})  # each writer chunk spans two shards
  moved = {k: jax.device_put(v, jax.sharding.NamedSharding(other, v.sharding.spec))
           for k, v in flat.items()}
  weight_manifest.verify(moved, man)
  bad = dict(host, **{"layers/w_gate_up": host["layers/w_gate_up"].copy()})
  bad["layers/w_gate_up"][0, 30, 1, 50] += 1e-3  # in the chunk of embed 24:36, mlp 48:96
  with pytest.raises(CheckpointError,
                     match=r"layers/w_gate_up\[0:1, 24:36, 0:2, 48:96\] does not match"):
    weight_manifest.verify(bad, man)


def test_decode_server_refuses_weights_that_do_not_match_their_manifest(tmp_path):
  cfg = load_config(None, [f"model.arch={json.dumps(ARCH)}"]).model.arch
  mesh = single_device_mesh()
  good = flat_state(nnx.state(create_model(cfg, mesh, seed=1, dtype="float32"), nnx.Param))
  other = flat_state(nnx.state(create_model(cfg, mesh, seed=2, dtype="float32"), nnx.Param))
  template = nnx.state(create_model(cfg, mesh, seed=0, dtype="float32"), nnx.Param)
  save_policy(str(tmp_path), 1, good, cfg, manifest=weight_manifest.build(good))
  loaded = flat_state(load_weights(template, str(tmp_path), cfg, step=1))
  assert_close(loaded, {k: np.asarray(v) for k, v in good.items()}, "verified load", atol=0)
  # the step holds other weights than its manifest describes (e.g. overwritten mid-read)
  save_policy(str(tmp_path), 2, other, cfg, manifest=weight_manifest.build(good))
  with pytest.raises(CheckpointError, match="step 2: embed.*does not match the hash"):
    load_weights(template, str(tmp_path), cfg, step=2)
  flat_state(load_weights(template, str(tmp_path), cfg, step=2, verify=False))  # unchecked


@pytest.mark.parametrize("cfg, environ, enabled, reason", [
    ({}, {}, False, "single-process"),
    ({"mode": "off", "coordinator_address": "10.0.0.1:1234"}, {}, False, "off"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}, {}, True,
     "config"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
          "JAX_PROCESS_ID": "3"}, True, "env"),
    ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, True, "slurm"),
    ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False, "single-process"),
    ({}, {"OMPI_COMM_WORLD_SIZE": "4"}, True, "ompi"),
    ({}, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True, "tpu"),
    ({"mode": "on"}, {}, True, "on"),
])
def test_when_a_process_joins_a_multi_process_run(cfg, environ, enabled, reason):
  launch = resolve(DistributedSection(**cfg), environ)
  assert (launch.enabled, launch.reason) == (enabled, reason)
  if reason == "config":  # the coordinator listens only where it was told to
    assert launch.kwargs["coordinator_bind_address"] == "127.0.0.1:1234"
    assert (launch.kwargs["num_processes"], launch.kwargs["process_id"]) == (2, 1)
  if reason == "env":
    assert (launch.kwargs["num_processes"], launch.kwargs["process_id"]) == (4, 3)


def test_an_incomplete_distributed_setting_is_refused_by_name():
  with pytest.raises(ConfigError, match="num_processes and distributed.process_id are not"):
    resolve(DistributedSection(coordinator_address="10.0.0.1:1234"), {})
  with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID='x'"):
    resolve(DistributedSection(), {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": "x"})
  with pytest.raises(ConfigError, match="process id 5 is not in"):
    resolve(DistributedSection(), {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": "5"})
  with pytest.raises(ConfigError, match="process_id 2 must be below"):
    load_config(None, ["model.arch.vocab_size=8", "distributed.num_processes=2",
                       "distributed.process_id=2"])
