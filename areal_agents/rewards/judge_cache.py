"""``JudgeCache``: a bounded LRU of judge replies keyed by (judge id, rendered prompt)."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["JudgeCache"]


class JudgeCache:
    """Least-recently-used replies, with hit and miss counts.

    A judge asks the cache before calling its model, so an identical prompt (the same answer
    to the same task, common once a policy converges) costs one call. Several judges may share
    one cache: the key holds the judge's id. Only successful replies are stored.

    Args:
        max_size: entries kept (the least recently used is evicted); 0 disables caching.

    Example:
        >>> cache = JudgeCache(max_size=2)
        >>> cache.put("j", "p1", "Score: 3"); cache.get("j", "p1"), cache.get("j", "p2")
        ('Score: 3', None)
        >>> cache.hits, cache.misses
        (1, 1)
    """

    def __init__(self, max_size: int = 4096) -> None:
        if max_size < 0:
            raise ValueError(f"JudgeCache max_size must be >= 0 (0 = off), got {max_size}")
        self.max_size = max_size
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[str, str], str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, judge_id: str, prompt: str) -> str | None:
        """The stored reply (now the most recent), or None; counts a hit or a miss."""
        key = (judge_id, prompt)
        reply = self._data.get(key)
        if reply is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return reply

    def put(self, judge_id: str, prompt: str, reply: str) -> None:
        """Store ``reply``, evicting the least recently used entry when full."""
        if not self.max_size:
            return
        self._data[(judge_id, prompt)] = reply
        self._data.move_to_end((judge_id, prompt))
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)
