"""The launch scripts parse (bash -n) and refuse bad usage; every shipped config validates; the
GKE JobSet manifest parses, and every asearcher command in it is a valid config plus overrides
whose addresses name pods the JobSet creates and whose mesh fills the slice it requests."""

import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import jax
import pytest
import yaml
from conftest import child_env

from asearcher_jax import placement
from asearcher_jax.config import load_config
from asearcher_jax.errors import ConfigError

pytestmark = pytest.mark.e2e

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
JOBSET = os.path.join(ROOT, "launch", "gke", "jobset.yaml")


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_launch_scripts_parse(script):
  done = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr


def test_the_scripts_for_new_targets_are_there():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"tpu_pod.sh", "multi_gpu.sh", "slurm.sbatch"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_validates(path):
  cfg = load_config(path)
  assert cfg.model.arch is not None or cfg.model.path is not None


def test_tpu_pod_script_refuses_an_unknown_command():
  done = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "launch"],
                        capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 2 and "unknown command launch" in done.stderr


def test_multi_gpu_script_plans_then_needs_addresses(tmp_path):
  """It runs `asearcher plan` first, then refuses a config that does not say where the
  replay queue and decode servers listen (configs/debug.yaml leaves that to asearcher train)."""
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  done = subprocess.run(["bash", os.path.join(ROOT, "launch", "multi_gpu.sh"),
                         "configs/debug.yaml", f"run.output_dir={tmp_path}"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert done.returncode != 0
  assert "learner: mesh" in done.stdout  # the plan ran first
  assert "needs placement.replay_address and placement.decode_addresses" in done.stderr


def _containers(jobset):
  for rj in jobset["spec"]["replicatedJobs"]:
    pod = rj["template"]["spec"]["template"]["spec"]
    for c in pod["containers"]:
      yield rj, pod, c


def _asearcher_argv(command: list[str]) -> list[str] | None:
  """The asearcher argv of a container command (also inside `bash -c`), else None."""
  if command[:2] == ["bash", "-c"]:
    command = shlex.split(command[2])
    if command[0] == "exec":
      command = command[1:]
  return command[1:] if command[0] == "asearcher" else None


def test_jobset_manifest_is_consistent():
  with open(JOBSET) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
  assert len(docs) == 1
  js = docs[0]
  assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
  name = js["metadata"]["name"]
  jobs = {rj["name"]: rj for rj in js["spec"]["replicatedJobs"]}
  assert set(jobs) == {"replay", "decode", "learner", "rollout"}
  checked = 0
  for rj, pod, c in _containers(js):
    argv = _asearcher_argv(c["command"])
    if argv is None:
      continue
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if re.match(r"^[a-z_]+(\.[a-z_]+)+=", a)
                 and "$" not in a]
    cfg = load_config(os.path.join(ROOT, config), overrides)  # raises on any bad key or value
    checked += 1
    addresses = list(cfg.placement.decode_addresses) + [a for a in (
        cfg.placement.replay_address,) if a]
    addresses += [a for a in argv if a.startswith(f"{name}-") and ":" in a]
    for address in addresses:  # <jobset>-<job>-<index>-<pod>.<jobset>:port of a real pod
      spread = re.search(r"\$\(\(JOB_COMPLETION_INDEX % (\d+)\)\)", address)
      if spread:  # rollout worker i uses decode server i % N: N must be the decode replicas
        assert int(spread.group(1)) == jobs["decode"]["replicas"], address
        address = address.replace(spread.group(0), "0")
      m = re.match(rf"^{name}-([a-z]+)-(\d+)-(\d+)\.{name}:\d+$", address)
      assert m, address
      job, index, pod_index = m.group(1), int(m.group(2)), int(m.group(3))
      assert job in jobs and index < jobs[job]["replicas"], address
      assert pod_index < jobs[job]["template"]["spec"]["parallelism"], address
    if argv[0] == "learn":  # the learner's mesh is the whole slice it asks for
      chips = rj["template"]["spec"]["parallelism"] * c["resources"]["limits"]["google.com/tpu"]
      assert cfg.placement.num_devices == chips
      assert cfg.distributed.mode == "on"
      assert len(cfg.placement.decode_addresses) == jobs["decode"]["replicas"]
    if argv[0] == "serve":
      assert cfg.serve.host == "0.0.0.0"  # reached by other pods: the token is required
      tpus = c["resources"]["limits"]["google.com/tpu"]
      assert cfg.placement.decode_num_devices == tpus
    env = {e["name"] for e in c.get("env", [])}
    if argv[0] in ("serve", "learn", "rollout"):
      assert "ASEARCHER_TOKEN" in env, c["name"]
  assert checked == 4  # decode, learner, rollout and retrieval commands
  replay = jobs["replay"]["template"]["spec"]["template"]["spec"]["containers"][0]
  assert "ASEARCHER_TOKEN" in {e["name"] for e in replay["env"]}


def test_placement_splits_memory_when_colocated_and_devices_when_not():
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), ["rl.decode_servers=2"])
  assert placement.memory_fraction(cfg, "learner") == pytest.approx(0.9 * 0.6)
  assert placement.memory_fraction(cfg, "decode") == pytest.approx(0.9 * 0.4 / 2)
  h100 = os.path.join(ROOT, "configs", "qwen2.5-7b-8xh100.yaml")
  cfg = load_config(h100, ["placement.decode_replica=2"])
  assert placement.memory_fraction(cfg, "learner") == placement.memory_fraction(cfg, "decode")
  assert placement.role_devices(cfg, "learner") == (0, 1, 2, 3)
  assert placement.role_devices(cfg, "decode") == (6,)
  decode = placement.role_config(cfg, "decode")
  assert decode.mesh.shape() == {"data": 1, "fsdp": 1, "tensor": 1}
  assert decode.model.param_dtype == "bfloat16" and cfg.model.param_dtype == "float32"
  learner = placement.role_config(cfg, "learner")
  assert learner.distributed.local_device_ids == (0, 1, 2, 3) and learner.mesh == cfg.mesh
  with pytest.raises(ConfigError, match="decode_replica 4: decode_devices .* hold 4 decode"):
    placement.role_devices(load_config(h100, ["placement.decode_replica=4"]), "decode")
  with pytest.raises(ConfigError, match="devices \\[3\\] are in both"):
    load_config(h100, ["placement.decode_devices=[3, 4]"])


def test_placement_is_applied_before_jax_starts():
  """In a fresh process: the role's memory share and devices, before any backend exists."""
  jax.devices()  # this test process starts JAX: too late to place it
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"))
  with pytest.raises(ConfigError, match="must be applied before JAX starts"):
    placement.apply(cfg, "learner", {})
  code = ("import os, jax; from asearcher_jax import placement; "
          "from asearcher_jax.config import load_config; "
          "c = placement.apply(load_config('configs/qwen2.5-7b-8xh100.yaml', "
          "['placement.decode_replica=1']), 'decode'); "
          "print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'], "
          "jax.config.read('jax_cuda_visible_devices'), c.model.param_dtype)")
  env = {k: v for k, v in os.environ.items() if k not in placement.MEM_FRACTION_VARS}
  env.update(JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["0.900", "5", "bfloat16"]
  # The operator's fraction under jaxlib's current name wins too: setting the older name
  # beside it made the GPU client refuse to start.
  code = ("import os; from asearcher_jax import placement; "
          "from asearcher_jax.config import load_config; "
          "placement.apply(load_config('configs/debug.yaml'), 'learner'); "
          "print(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=dict(env, XLA_CLIENT_MEM_FRACTION="0.5"), timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["None"]


def test_remote_services_need_a_token_and_addresses_are_checked(monkeypatch):
  monkeypatch.delenv("ASEARCHER_TOKEN", raising=False)
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"),
                    ["placement.decode_addresses=[10.0.0.5:50051, 127.0.0.1:50052]"])
  with pytest.raises(ConfigError, match=r"decode servers at \['10.0.0.5:50051'\] are not on "
                                        "loopback and require a token"):
    placement.decode_addresses(cfg, None)
  assert placement.decode_addresses(cfg, ["127.0.0.1:1"]) == ["127.0.0.1:1"]  # given wins
  monkeypatch.setenv("ASEARCHER_TOKEN", "s3cret")
  assert placement.worker_decode_address(cfg, 3) == "127.0.0.1:50052"  # round robin
  with pytest.raises(ConfigError, match="no replay queue address"):
    placement.replay_address(cfg, None)
  with pytest.raises(ConfigError, match="expected host:port, got 'somewhere'"):
    placement.replay_address(cfg, "somewhere")
  assert placement.replay_address(cfg, "10.0.0.9:50100") == "10.0.0.9:50100"


def test_multi_gpu_script_starts_as_many_decode_servers_as_the_memory_split_assumes(tmp_path):
  """Colocated with two addresses and rl.decode_servers=1, each GPU was promised to the
  learner (0.54) and two decode servers (0.36 each): 1.26 of it."""
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  proc = subprocess.Popen(
      ["bash", os.path.join(ROOT, "launch", "multi_gpu.sh"), "configs/debug.yaml",
       f"run.output_dir={tmp_path}", "placement.replay_address=127.0.0.1:1",
       "placement.decode_addresses=[127.0.0.1:2, 127.0.0.1:3]"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
      start_new_session=True)
  try:
    _, err = proc.communicate(timeout=120)
  finally:  # had the check failed, the script would have started servers: stop them all
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert proc.returncode != 0
  assert "2 placement.decode_addresses, but 1 decode servers (rl.decode_servers" in err
  assert not (tmp_path / "logs").exists()  # nothing started


def _stop_leftovers(marker: str) -> None:
  """Kills, by id, every process whose command line names `marker` (a test's run folder)."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if marker.encode() in f.read() and int(pid) != os.getpid():
          os.kill(int(pid), signal.SIGKILL)
    except OSError:  # gone meanwhile
      pass


# A script started from a terminal takes Ctrl-C; one started by a shell without job control in
# the background (as a CI runner may start the tests) inherits SIGINT ignored, which bash then
# cannot trap: the script is started with the terminal's default back (set, then exec'd into,
# so no fork of this multithreaded process runs Python code).
WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; "
                       "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execvp(sys.argv[1], sys.argv[1:])"]


def _multi_gpu_until(tmp_path, name: str, args: list[str], until, timeout_s: float = 240):
  """launch/multi_gpu.sh on CPU (configs/debug.yaml) in its own session until `until()`, then
  Ctrl-C as a terminal sends it (SIGINT to the script's process group); returns its output."""
  out = tmp_path / f"{name}.out"
  with open(out, "w") as f:
    proc = subprocess.Popen([*WITH_DEFAULT_SIGINT, "bash",
                             os.path.join(ROOT, "launch", "multi_gpu.sh"), "configs/debug.yaml",
                             *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=child_env(PYTHON=sys.executable), start_new_session=True)
  try:
    deadline = time.monotonic() + timeout_s
    while not until():
      assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
      time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)  # the script gives the learner's last step and checkpoint 300 s
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    _stop_leftovers(str(tmp_path))
  return out.read_text()


def test_multi_gpu_script_stops_the_learner_first_and_resumes_on_the_restored_weights(tmp_path):
  """Stopped, the learner finishes its step and checkpoints (it publishes to the decode servers
  and acknowledges to the queue: they used to get the signal at the same moment, and every step
  since the last checkpoint was lost). Resumed, the rollout workers start once the servers
  hold the restored weights (they used to start on a fresh server's initial weights)."""
  from asearcher_jax.procs import free_ports
  from asearcher_jax.rl.supervisor import replay_version
  run = tmp_path / "run"
  replay, decode, search = free_ports(3)
  args = [f"run.output_dir={run}", f"placement.replay_address=127.0.0.1:{replay}",
          f"placement.decode_addresses=[127.0.0.1:{decode}]",
          f"search.url=http://127.0.0.1:{search}", "rl.group_size=2", "rl.batch_groups=1",
          "rl.filter_equal_rewards=false", "rl.total_steps=1000", "rl.rollout_workers=1",
          # rollouts at most a version ahead: a learner slow to compile (a loaded machine) does
          # not find hundreds of groups queued, each a lease its stop must acknowledge
          "agent.max_turns=2", "rl.max_head_offpolicyness=1", "model.arch.num_layers=1",
          "serve.slots=4",  # less to compile
          "checkpoint.every_steps=1000"]  # the final checkpoint only
  metrics, logs = run / "metrics.jsonl", run / "logs"
  _multi_gpu_until(tmp_path, "first", args,
                   lambda: metrics.exists() and metrics.read_text().count("\n") >= 1)
  assert "learner finished" in (logs / "learner.log").read_text()
  rows = [json.loads(line) for line in metrics.read_text().splitlines()]
  trained = len(rows)
  assert max(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == trained
  journal = [json.loads(line) for line in (run / "replay" / "journal.jsonl").read_text()
             .splitlines()]
  acked = {g for r in journal if r["op"] == "ack" for g in r["groups"]}
  assert {g for r in rows for g in r["groups"]} <= acked  # not to be trained again
  served = max(r["v"] for r in journal if r["op"] == "version")

  seen = {}

  def rollouts_started():  # the worker's start line, then the queue's version at that moment
    log = logs / "rollout0.log"
    if (log.read_text() if log.exists() else "").count("[multi_gpu] rollout0:") < 2:
      return False
    seen["version"] = replay_version(f"127.0.0.1:{replay}")
    return True

  _multi_gpu_until(tmp_path, "resumed", ["--resume", *args], rollouts_started)
  assert seen["version"] > served, "rollouts began before the restored weights were served"
  restored = re.search(r"resumed from step (\d+) \(publishing it as version (\d+)\)",
                       (logs / "learner.log").read_text())
  assert restored and int(restored.group(1)) == trained
  assert seen["version"] >= int(restored.group(2))
