"""`asearcher train` on one host: the retrieval server, decode server(s), the replay queue, the
learner and rollout worker(s) as processes, supervised.

A rollout worker that dies is restarted (its in-flight groups were never put; the queue tells
the new one its accepted count and data cursor). Any other process dying stops the run; rerun
with `--resume` to continue from the last checkpoint. Ctrl-C (or SIGTERM) asks the learner to
checkpoint and stop, then stops the rest. Progress: a bar over the learner's steps and one
compact line per step on the console; metrics.jsonl and TensorBoard files in the run folder;
each process's log in <run>/logs/.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Callable

from asearcher_jax.config import Config
from asearcher_jax.errors import AsearcherError
from asearcher_jax.jsonl import Follower
from asearcher_jax.procs import Child, Interrupted, free_ports, wait_ready
from asearcher_jax.rl.plot import plot_metrics
from asearcher_jax.rl.training_log import RolloutLogs, starved, starved_after

RESTARTS = 5  # per rollout worker
PLOT_EVERY_S = 20.0  # the learning curve is redrawn at most this often while training
STARVED_CHECK_S = 10.0  # once no step has come for this long, the scored groups are read this often


def _has_checkpoint(directory: str) -> bool:
  from asearcher_jax.checkpoint import Checkpointer
  if not os.path.isdir(directory):
    return False
  with Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.latest_step() is not None


def _grpc_ready(address: str, kind: str) -> Callable[[], bool]:
  def check() -> bool:
    async def go():
      if kind == "decode":
        from asearcher_jax.inference.client import DecodeClient
        async with DecodeClient(address, timeout=2) as c:
          await c.stats()
      else:
        from asearcher_jax.replay import ReplayClient
        c = ReplayClient(address)
        try:
          await c.state("")
        finally:
          await c.close()
      return True
    return asyncio.run(go())
  return check


def _http_ready(url: str) -> Callable[[], bool]:
  def check() -> bool:
    import urllib.request
    with urllib.request.urlopen(url + "/health", timeout=2) as r:
      return r.status == 200
  return check


def train(cfg: Config, *, config_path: str | None, overrides: list[str], resume: bool,
          progress: bool = True, echo=print) -> int:
  """Starts and supervises every process; returns the exit status."""
  from tqdm.auto import tqdm

  from asearcher_jax.memory_plan import architecture
  from asearcher_jax.rl.launch import check_sampling
  check_sampling(cfg)
  out_dir = os.path.abspath(cfg.run.output_dir)
  log_dir = os.path.join(out_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  curve = os.path.join(out_dir, "learning_curve.png")
  ckpt_dir = cfg.checkpoint.directory or os.path.join(out_dir, "checkpoints")
  journal = os.path.join(out_dir, "replay", "journal.jsonl")
  if not resume and (os.path.exists(ckpt_dir) or os.path.exists(journal)):
    raise AsearcherError(f"{out_dir} holds a previous run: pass --resume to continue it, or "
                         "choose another run.output_dir")
  py = [sys.executable, "-m", "asearcher_jax.cli"]
  base = (["--config", config_path] if config_path else []) + list(overrides)
  replay_port, retrieval_port, *decode_ports = free_ports(2 + cfg.rl.decode_servers)
  replay_addr = f"127.0.0.1:{replay_port}"
  decode_addrs = [f"127.0.0.1:{p}" for p in decode_ports]
  retrieval_url = f"http://127.0.0.1:{retrieval_port}"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  cpu_env = dict(env, JAX_PLATFORMS="cpu")  # helpers must not claim the accelerator
  common = base + [f"search.url={retrieval_url}", f"run.output_dir={out_dir}"]
  children: dict[str, Child] = {}
  children["replay"] = Child("replay", [sys.executable, "-m", "asearcher_jax.replay.server",
                                        "--journal", os.path.join(out_dir, "replay"),
                                        "--port", str(replay_port),
                                        "--vocab-size", str(architecture(cfg).vocab_size)],
                            log_dir, cpu_env)
  if cfg.search.backend == "local":
    children["retrieval"] = Child("retrieval", py + ["retrieval", "serve", *base, "--port",
                                                     str(retrieval_port)], log_dir, cpu_env)
  for i, p in enumerate(decode_ports):
    children[f"decode{i}"] = Child(f"decode{i}", py + [  # replica i: its share of the devices
        "serve", *common, f"serve.grpc_port={p}", "serve.http_port=null",
        f"placement.decode_replica={i}"], log_dir, env)
  learner_argv = py + ["learn", *common, "--replay", replay_addr, "--decode", *decode_addrs] + \
      (["--resume"] if resume else [])
  workers = [Child(f"rollout{i}", py + ["rollout", *common, "--worker", str(i), "--workers",
                                        str(cfg.rl.rollout_workers), "--replay", replay_addr,
                                        "--decode", decode_addrs[i % len(decode_addrs)]],
                   log_dir, env) for i in range(cfg.rl.rollout_workers)]
  learner = Child("learner", learner_argv, log_dir, env)
  stopping = {"flag": False}

  def on_signal(*_):
    stopping["flag"] = True

  previous = {s: signal.signal(s, on_signal)
              for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
  is_stopping = lambda: stopping["flag"]  # noqa: E731
  bar = None
  status = 1
  rows: list[dict] = []  # metrics.jsonl's lines, read as the learner appends them
  metrics, rollouts = Follower(metrics_path), RolloutLogs(out_dir)
  try:
    echo(f"run folder {out_dir} (logs in {log_dir})")
    children["replay"].start()
    wait_ready(_grpc_ready(replay_addr, "replay"), children["replay"], "the replay queue", 60,
               is_stopping, echo=echo)
    if "retrieval" in children:
      children["retrieval"].start()
      wait_ready(_http_ready(retrieval_url), children["retrieval"], "the retrieval server", 600,
                 is_stopping, echo=echo)
    for i, a in enumerate(decode_addrs):
      children[f"decode{i}"].start()
    for i, a in enumerate(decode_addrs):
      wait_ready(_grpc_ready(a, "decode"), children[f"decode{i}"], f"decode server {i}", 900,
                 is_stopping, echo=echo)
    echo(f"replay {replay_addr}; decode {', '.join(decode_addrs)}"
         + (f"; retrieval {retrieval_url}" if "retrieval" in children else ""))
    served_before = restored_to_wait_above(replay_addr, ckpt_dir) if resume else None
    learner.start()
    if served_before is not None:  # rollouts wait until the servers hold the restored weights
      wait_ready(lambda: replay_version(replay_addr) > served_before, learner,
                 "the learner to publish its restored weights", 900, is_stopping, retries=0)
    for w in workers:
      w.start()
    rows = metrics.read()
    bar = tqdm(total=cfg.rl.total_steps, initial=rows[-1]["step"] if rows else 0, desc="train",
               unit="step", disable=not progress, dynamic_ncols=True)
    from asearcher_jax.rl.training_log import console_line
    (bar.write if progress else echo)(f"learning curve: {curve} (refreshed as it trains); "
                                      f"TensorBoard: tensorboard --logdir "
                                      f"{os.path.join(out_dir, 'tensorboard')}")
    plotted = 0.0
    # Starvation: while no step comes, the groups scored since the last one are read now and
    # then; a warning once `first_warning` of them were all filtered out, again at each doubling.
    first_warning = starved_after(cfg.rl)
    last_step, checked, warn_at = time.time(), time.monotonic(), first_warning
    while True:
      time.sleep(0.5)
      lines = metrics.read()
      rows += lines
      for m in lines:
        bar.n = m["step"]
        bar.refresh()
        (bar.write if progress else echo)(console_line(m["step"], cfg.rl.total_steps, m))
      if lines:
        last_step, warn_at = time.time(), first_warning
      elif min(time.time() - last_step, time.monotonic() - checked) > STARVED_CHECK_S:
        checked = time.monotonic()
        note = starved(rollouts.update(), last_step, warn_at)
        if note:
          (bar.write if progress else echo)(note)
          warn_at *= 2
      if lines and time.monotonic() - plotted > PLOT_EVERY_S:
        plot_metrics(rows, curve, title=f"{cfg.run.name}: {out_dir}",
                     rollouts=rollouts.update())
        plotted = time.monotonic()
      if stopping["flag"]:
        echo("stopping: asking the learner to checkpoint")
        learner.stop(signal.SIGTERM, wait_s=300)
        status = 130
        break
      if not learner.alive():
        code = learner.proc.returncode
        if code == 0:
          status = 0
        else:
          echo(f"the learner exited with status {code}; its log ({learner.log_path}):\n"
               f"{learner.tail()}\nrerun with --resume to continue from the last checkpoint")
        break
      dead = [c for c in children.values() if not c.alive()]
      if dead:
        c = dead[0]
        echo(f"{c.name} exited with status {c.proc.returncode}; its log ({c.log_path}):\n"
             f"{c.tail()}")
        break
      failing = next((w for w in workers if not w.alive() and w.restarts >= RESTARTS), None)
      if failing is not None:  # a failure (status 1), not an interruption (130)
        echo(f"{failing.name} keeps failing; its log ({failing.log_path}):\n{failing.tail()}\n"
             "stopping: asking the learner to checkpoint")
        learner.stop(signal.SIGTERM, wait_s=300)
        break
      for w in workers:
        if not w.alive():
          w.restarts += 1
          echo(f"{w.name} exited ({w.proc.returncode}); restarting it ({w.restarts}/{RESTARTS})")
          w.start()
  except Interrupted as e:  # Ctrl-C while starting: an interruption, as once under way
    echo(f"{e}; stopping")
    status = 130
  finally:
    if bar is not None:
      bar.close()
    for w in workers:
      w.stop()
    learner.stop(signal.SIGTERM, wait_s=300)
    for c in reversed(list(children.values())):
      c.stop()
    for s, h in previous.items():
      signal.signal(s, h)
  rows += metrics.read()  # what the learner wrote last
  plot_metrics(rows, curve, title=f"{cfg.run.name}: {out_dir}", rollouts=rollouts.update())
  echo(f"metrics: {metrics_path}; every scored group: {os.path.join(out_dir, 'rollouts')}; "
       f"learning curve: {curve}; TensorBoard: "
       f"{os.path.join(out_dir, 'tensorboard')}; checkpoints: {ckpt_dir}; "
       f"policy: {os.path.join(out_dir, 'weights')}")
  return status


def replay_version(address: str, token: str | None = None) -> int:
  """The replay queue's version: the newest the decode servers are known to hold."""
  from asearcher_jax.replay import SyncReplayClient
  c = SyncReplayClient(address, token=token)
  try:
    return int(c.state("").version)
  finally:
    c.close()


def restored_to_wait_above(replay_address: str, ckpt_dir: str,
                           token: str | None = None) -> int | None:
  """On --resume, before the learner starts: the queue's version, which rises once the decode
  servers hold the learner's restored weights (rollout workers start only then, or a fresh
  server's initial weights would write the first groups). None: nothing to wait for -- a run
  stopped before its first checkpoint and publication restarts at version 0, which the
  servers already hold, and publishes nothing. Used by launch/multi_gpu.sh too."""
  before = replay_version(replay_address, token)
  return before if before > 0 or _has_checkpoint(ckpt_dir) else None
