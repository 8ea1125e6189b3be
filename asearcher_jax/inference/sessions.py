"""Multi-turn KV reuse for the driver: when a request that names a session finishes, its slot's
keys and values are kept here, least recently used first to go: on device up to `device`
sessions, then offloaded to host memory up to `host`, then dropped. The session's next request
prefills only the tokens after the longest common prefix with what the cache holds.

Owned by the driver's engine thread (no locking); a lost entry is only a cache miss.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from asearcher_jax.inference.engine import DecodeState, Engine, Prefix


@dataclasses.dataclass
class _Session:
  tokens: list[int]  # tokens whose keys/values the cache holds
  version: int
  prefix: Prefix | None = None  # on device
  host: tuple[np.ndarray, np.ndarray] | None = None  # offloaded k, v [layers, n, kv, head_dim]


class SessionCache:
  def __init__(self, engine: Engine, *, device: int, host: int):
    self.engine, self.device, self.host = engine, device, host
    self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()

  def __contains__(self, session_id: str) -> bool:
    return session_id in self._sessions

  def end(self, session_id: str) -> bool:
    """Forgets a session; whether it was held."""
    return self._sessions.pop(session_id, None) is not None

  def clear(self) -> None:
    self._sessions.clear()

  def counts(self) -> tuple[int, int]:
    """(sessions on device, sessions in host memory)."""
    s = self._sessions.values()
    return sum(x.prefix is not None for x in s), sum(x.host is not None for x in s)

  def take(self, session_id: str, context: list[int]) -> tuple[Prefix | None, int]:
    """The cached prefix `context` can reuse and its length (None, 0: none). The entry leaves
    the cache: the request's slot owns those keys and values now."""
    s = self._sessions.pop(session_id, None)
    if s is None:
      return None, 0
    n = 0
    limit = min(len(s.tokens), len(context) - 1)  # at least one token must be prefilled
    while n < limit and s.tokens[n] == context[n]:
      n += 1
    if n == 0:
      return None, 0
    if s.prefix is not None:
      prefix = s.prefix
    else:
      k, v = s.host
      prefix = self.engine.empty_prefix(len(s.tokens), k, v)
    prefix.length = np.asarray([n], np.int32)  # slots >= n are overwritten before being read
    return prefix, n

  def save(self, session_id: str, tokens: list[int], state: DecodeState, slot: int,
           version: int) -> None:
    """Keeps the first len(tokens) positions of `slot`'s cache as the session's, evicting the
    least recently used beyond the limits."""
    prefix = self.engine.extract(state, slot, len(tokens))
    self._sessions.pop(session_id, None)
    self._sessions[session_id] = _Session(tokens, version, prefix=prefix)
    on_device = [k for k, s in self._sessions.items() if s.prefix is not None]
    for key in on_device[:max(0, len(on_device) - self.device)]:  # LRU first
      s = self._sessions[key]
      if self.host > 0:
        n = len(s.tokens)
        # Copy whole, slice on the host: a device slice would compile once per length.
        s.host = (np.asarray(s.prefix.cache.k)[:, 0, :n], np.asarray(s.prefix.cache.v)[:, 0, :n])
      s.prefix = None
      if s.host is None:
        del self._sessions[key]
    on_host = [k for k, s in self._sessions.items() if s.host is not None]
    for key in on_host[:max(0, len(on_host) - self.host)]:
      del self._sessions[key]
