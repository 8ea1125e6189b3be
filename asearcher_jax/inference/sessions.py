"""Multi-turn KV reuse for the driver: when a request that names a session finishes, the KV
pages its slot filled stay with the session, least recently used first to go: in the pool up
to `device` sessions (or until running requests need the pages), then copied to host memory
up to `host`, then dropped. The session's next request keeps the pages up to the longest
common prefix with what they hold and prefills only the tokens after it.

Owned by the driver's engine thread (no locking); a lost entry is only a cache miss.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable

import numpy as np

from asearcher_jax.models.paged_kv import pages_for

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Session:
  tokens: list[int]  # tokens whose keys/values the session holds
  version: int
  pages: list[int] | None = None  # in the pool
  host: tuple[np.ndarray, np.ndarray] | None = None  # offloaded k, v [layers, n, kv, head_dim]


@dataclasses.dataclass
class Held:
  """What a session continues from: its pages in the pool, or its keys and values on the host,
  and how many leading tokens of the new context they hold."""

  reused: int
  pages: list[int] | None = None
  host: tuple[np.ndarray, np.ndarray] | None = None


class SessionCache:
  def __init__(self, *, device: int, host: int, page_size: int,
               read: Callable[[list[int], int], tuple[np.ndarray, np.ndarray]],
               free: Callable[[list[int]], None]):
    """`read(pages, tokens)` copies pages to the host; `free(pages)` returns them to the pool."""
    self.device, self.host, self.page_size = device, host, page_size
    self._read, self._free = read, free
    self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()

  def __contains__(self, session_id: str) -> bool:
    return session_id in self._sessions

  def end(self, session_id: str) -> bool:
    """Forgets a session; whether it was held."""
    s = self._sessions.pop(session_id, None)
    if s is not None and s.pages:
      self._free(s.pages)
    return s is not None

  def clear(self) -> None:
    for key in list(self._sessions):
      self.end(key)

  def counts(self) -> tuple[int, int]:
    """(sessions in the pool, sessions in host memory)."""
    s = self._sessions.values()
    return sum(x.pages is not None for x in s), sum(x.host is not None for x in s)

  def common(self, session_id: str, context: list[int]) -> int:
    """Tokens of `context` that `take` would reuse, the entry left in place."""
    s = self._sessions.get(session_id)
    if s is None:
      return 0
    limit = min(len(s.tokens), len(context) - 1)  # at least one token must be prefilled
    # The usual turn extends its session: one list comparison (the driver asks before it
    # admits a turn and again as it takes the pages), rather than a Python loop per token.
    if s.tokens[:limit] == context[:limit]:
      return limit
    n = 0
    while n < limit and s.tokens[n] == context[n]:
      n += 1
    return n

  def take(self, session_id: str, context: list[int]) -> Held | None:
    """What `context` can reuse (None: nothing). The entry leaves the cache: the request owns
    those pages now, less the ones past the common prefix, which go back to the pool."""
    n = self.common(session_id, context)
    s = self._sessions.pop(session_id, None)
    if s is None:
      return None
    if s.pages is None:
      return Held(n, host=s.host) if n else None
    keep = pages_for(n, self.page_size)
    self._free(s.pages[keep:])
    return Held(n, pages=s.pages[:keep]) if n else None

  def save(self, session_id: str, tokens: list[int], pages: list[int], version: int) -> None:
    """Gives the session the pages that hold `tokens`, evicting the least recently used
    beyond the limits."""
    self.end(session_id)
    self._sessions[session_id] = _Session(tokens, version, pages=pages)
    on_device = [k for k, s in self._sessions.items() if s.pages is not None]
    for key in on_device[:max(0, len(on_device) - self.device)]:  # LRU first
      self._offload(key)

  def evict(self, keep: str | None = None) -> bool:
    """Moves the least recently used session but `keep` out of the pool (to host memory, or
    dropped); whether there was one. For requests that need the pages."""
    for key, s in self._sessions.items():
      if s.pages is not None and key != keep:
        self._offload(key)
        return True
    return False

  def _offload(self, key: str) -> None:
    s = self._sessions[key]
    pages, s.pages = s.pages, None
    try:
      if self.host > 0:
        s.host = self._read(pages, len(s.tokens))
    except Exception:  # losing a cache entry is a miss next turn
      log.exception("could not copy session %s to host memory", key)
    finally:
      self._free(pages)
    if s.host is None:
      del self._sessions[key]
    on_host = [k for k, x in self._sessions.items() if x.host is not None]
    for k in on_host[:max(0, len(on_host) - self.host)]:
      del self._sessions[k]
