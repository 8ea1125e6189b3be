"""A supervisor's child processes (`asearcher train`): started without fork(), tied to the
supervisor's life, and started once more when one dies before it is ready.

By the time the supervisor starts most children it has talked gRPC (readiness checks), so gRPC
threads run in it. A fork() then runs gRPC's fork handlers in the child, which skip their work
when other threads are inside gRPC ("skipping fork() handlers") and can leave the child with a
closed epoll descriptor ("epoll_wait error: Bad file descriptor") that kills it before it
execs: a loaded machine made that happen. With no `preexec_fn`, CPython starts a child with
vfork() and exec, which runs no fork handlers; the child then ties itself to the supervisor
(`follow_supervisor`) as its first act, which a `preexec_fn` used to do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Callable

from asearcher_jax.errors import AsearcherError

SUPERVISOR_ENV = "ASEARCHER_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def free_ports(n: int) -> list[int]:
  """`n` distinct free loopback ports: every socket stays bound until all are picked (one at a
  time, the kernel may hand out a port it just freed again)."""
  with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(n)]
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]


def free_port() -> int:
  return free_ports(1)[0]


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists (a staging folder named for its writer is still in use)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def follow_supervisor() -> None:
  """In a child started by `Child` (or launch/multi_gpu.sh): receive SIGTERM when the supervisor
  dies, even by SIGKILL, so no server is left holding ports or an accelerator (Linux; elsewhere
  nothing happens)."""
  pid = os.environ.pop(SUPERVISOR_ENV, None)  # our own children answer to us, not to it
  if not pid:
    return
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  except (OSError, AttributeError):
    return
  if os.getppid() != int(pid):  # it died before we could tie ourselves to it
    os.kill(os.getpid(), signal.SIGTERM)


class ChildExited(AsearcherError):
  """A child exited before it was ready."""


class Child:
  """One supervised process; its output goes to <log_dir>/<name>.log, appended per start."""

  def __init__(self, name: str, argv: list[str], log_dir: str, env: dict | None = None):
    self.name, self.argv, self.env = name, argv, env
    self.log_path = os.path.join(log_dir, f"{name}.log")
    self.restarts = 0
    self.proc: subprocess.Popen | None = None

  def start(self) -> None:
    env = dict(os.environ if self.env is None else self.env)
    env[SUPERVISOR_ENV] = str(os.getpid())
    with open(self.log_path, "a") as log:
      log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n")
      log.flush()
      # No preexec_fn: that would force fork() (see the module's docstring).
      self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)

  def alive(self) -> bool:
    return self.proc is not None and self.proc.poll() is None

  def stop(self, sig=signal.SIGTERM, wait_s: float = 30.0) -> None:
    if not self.alive():
      return
    self.proc.send_signal(sig)
    try:
      self.proc.wait(wait_s)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()

  def tail(self, n: int = 15) -> str:
    try:
      with open(self.log_path) as f:
        return "".join(f.readlines()[-n:])
    except OSError:
      return ""


class Interrupted(AsearcherError):
  pass


def wait_ready(check: Callable[[], bool], child: Child, what: str, timeout_s: float,
               stopping: Callable[[], bool] = lambda: False, retries: int = 1,
               echo: Callable[[str], None] = print) -> None:
  """Waits until `check()` is true for a started `child`. A child that exits first is started
  again with the same arguments, `retries` times at most (a start can fail for reasons of the
  moment, such as a loaded machine), then reported with its log."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if stopping():
      raise Interrupted(f"interrupted while waiting for {what}")
    if not child.alive():
      message = (f"{what} exited with status {child.proc.returncode} while starting; its log "
                 f"({child.log_path}):\n{child.tail()}")
      if child.restarts >= retries:
        raise ChildExited(message)
      child.restarts += 1
      echo(f"{message}\nstarting {what} again ({child.restarts}/{retries})")
      child.start()
      deadline = time.monotonic() + timeout_s
      continue
    try:
      if check():
        return
    except Exception:  # noqa: BLE001 -- not up yet
      pass
    time.sleep(0.3)
  raise AsearcherError(f"{what} not ready after {timeout_s:.0f}s; see {child.log_path}")
