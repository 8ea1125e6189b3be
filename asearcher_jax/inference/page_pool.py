"""The host side of the paged KV cache: which pages are free (the driver's engine thread owns it).

Pages are ids 1..n of the engine's pool (0 is the sink, never handed out). Lowest ids go
first, so a lightly loaded server keeps its pages together.
"""

from __future__ import annotations

import heapq


class PagePool:
  def __init__(self, pages: int):
    self.total = pages
    self._free = list(range(1, pages + 1))  # a heap: sorted is one

  @property
  def free(self) -> int:
    return len(self._free)

  def take(self, n: int) -> list[int]:
    """n free pages; ValueError when fewer are free (the caller checks `free` first)."""
    if n > len(self._free):
      raise ValueError(f"{n} KV pages asked for, {len(self._free)} of {self.total} free")
    return [heapq.heappop(self._free) for _ in range(n)]

  def give(self, pages: list[int]) -> None:
    for p in pages:
      heapq.heappush(self._free, p)
