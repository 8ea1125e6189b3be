"""The supervisor's children (`asearcher train`): they start every time although the supervisor
already holds busy gRPC channels, a child that dies while starting is started once more and
then reported with its log, and children die with a supervisor killed by SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import child_env

from asearcher_jax.procs import Child, ChildExited, free_port, wait_ready
from asearcher_jax.replay import ReplayQueue, ReplayServer, SyncReplayClient
from asearcher_jax.rl.supervisor import _grpc_ready

ENV = child_env()


def test_children_start_every_time_while_the_parent_talks_grpc(tmp_path, capfd):
  """The supervisor polls its servers over gRPC while it starts the others; a fork() then ran
  gRPC's fork handlers half-way ("skipping fork() handlers") and could kill the child."""
  server = ReplayServer(ReplayQueue(None)).start_in_thread()
  busy = threading.Event()
  done = threading.Event()

  def poll():
    client = SyncReplayClient(server.address)
    try:
      while not done.is_set():
        client.state("")
        busy.set()
    finally:
      client.close()

  pollers = [threading.Thread(target=poll) for _ in range(2)]
  for t in pollers:
    t.start()
  try:
    assert busy.wait(30)
    for i in range(6):
      port = free_port()
      child = Child(f"replay{i}", [sys.executable, "-m", "asearcher_jax.replay.server",
                                   "--port", str(port)], str(tmp_path), ENV)
      child.start()
      try:  # no second chance: each start must succeed as it is
        wait_ready(_grpc_ready(f"127.0.0.1:{port}", "replay"), child, f"replay {i}", 60,
                   retries=0)
      finally:
        child.stop()
  finally:
    done.set()
    for t in pollers:
      t.join()
    server.stop_thread()
  assert "fork() handlers" not in capfd.readouterr().err  # no fork() happened


FLAKY = textwrap.dedent("""
    import os, sys, time
    marker = sys.argv[1]
    if not os.path.exists(marker + ".started"):
      open(marker + ".started", "w").close()
      print("the port was taken", flush=True)
      sys.exit(3)
    open(marker + ".ready", "w").close()
    time.sleep(120)
""")


def test_a_child_that_dies_while_starting_is_started_once_more(tmp_path):
  marker = str(tmp_path / "m")
  child = Child("flaky", [sys.executable, "-c", FLAKY, marker], str(tmp_path), ENV)
  said = []
  child.start()
  try:
    wait_ready(lambda: os.path.exists(marker + ".ready"), child, "the flaky server", 60,
               echo=said.append)
    assert child.alive() and child.restarts == 1
  finally:
    child.stop()
  [note] = said
  assert "exited with status 3 while starting" in note and "the port was taken" in note
  with open(child.log_path) as f:
    assert f.read().count("\n=== ") == 2  # both starts, one log


def test_a_child_that_keeps_dying_is_reported_with_its_log(tmp_path):
  child = Child("broken", [sys.executable, "-c", "print('bad config: no such key'); exit(2)"],
                str(tmp_path), ENV)
  child.start()
  with pytest.raises(ChildExited, match="(?s)status 2 while starting.*bad config: no such key"):
    wait_ready(lambda: False, child, "the broken server", 60, echo=lambda _: None)
  assert child.restarts == 1  # started twice in all


SUPERVISOR = textwrap.dedent("""
    import sys, time
    from asearcher_jax.procs import Child
    child = Child("sleeper", [sys.executable, "-c",
                              "from asearcher_jax.procs import follow_supervisor; "
                              "follow_supervisor(); import time; print('up', flush=True); "
                              "time.sleep(120)"], sys.argv[1])
    child.start()
    print(child.proc.pid, flush=True)
    time.sleep(120)
""")


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_supervisor(tmp_path):
  sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], env=ENV,
                         stdout=subprocess.PIPE, text=True)
  try:
    pid = int(sup.stdout.readline())
    log = tmp_path / "sleeper.log"
    deadline = time.monotonic() + 60
    while "up" not in (log.read_text() if log.exists() else "").splitlines():
      assert time.monotonic() < deadline and _running(pid)
      time.sleep(0.1)
    sup.send_signal(signal.SIGKILL)
    sup.wait()
    deadline = time.monotonic() + 30
    while _running(pid):
      assert time.monotonic() < deadline, "the child outlived its supervisor"
      time.sleep(0.1)
  finally:
    sup.kill()
