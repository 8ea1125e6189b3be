"""An asyncio server (async `start()` / `stop()`) run on a thread of its own, with its own event
loop: for tests and for servers colocated with a learner or a benchmark."""

from __future__ import annotations

import asyncio
import threading


class BackgroundServer:
  """Mixin: `start_in_thread()` returns once the server is up (or raises what stopped it);
  `stop_thread()` stops it and joins the thread."""

  _thread_name = "server"
  _thread: threading.Thread | None = None
  _loop: asyncio.AbstractEventLoop | None = None
  _stopped: asyncio.Event | None = None

  async def start(self) -> None:
    raise NotImplementedError

  async def stop(self) -> None:
    raise NotImplementedError

  def start_in_thread(self):
    ready = threading.Event()
    failure: list[BaseException] = []

    def run():
      self._loop = asyncio.new_event_loop()
      asyncio.set_event_loop(self._loop)
      self._stopped = asyncio.Event()
      try:
        self._loop.run_until_complete(self.start())
      except BaseException as e:  # reported to the caller, after releasing what started
        failure.append(e)
        self._loop.run_until_complete(self.stop())
        self._loop.close()
        ready.set()
        return
      ready.set()
      self._loop.run_until_complete(self._stopped.wait())
      self._loop.run_until_complete(self.stop())
      self._loop.close()

    self._thread = threading.Thread(target=run, name=self._thread_name, daemon=True)
    self._thread.start()
    ready.wait()
    if failure:
      raise failure[0]
    return self

  def stop_thread(self) -> None:
    if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
      self._loop.call_soon_threadsafe(self._stopped.set)
    if self._thread is not None:
      self._thread.join(timeout=30)
