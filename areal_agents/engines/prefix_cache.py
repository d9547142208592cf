"""``PrefixCache``: the KV cache of each session's last turn, reused by its next turn.

A multi-turn agent re-sends the whole conversation every turn, so turn ``k + 1``'s prompt
starts with turn ``k``'s prompt and completion. When a completion of a session finishes, the
engine keeps the keys/values of every token it fed (``prompt + completion[:-1]``: the last
token was sampled, never fed). The session's next request reuses them for its longest common
prefix with the new prompt (at most ``len(prompt) - 1`` tokens: the last prompt token is always
computed, it yields the first logits) and prefills only the rest.

Rules:
    * one entry per session (the latest finished completion), evicted least recently used
      when the cached tokens of all sessions exceed ``max_tokens``;
    * an entry is only used at the weight ``version`` that computed it; ``clear()`` on every
      weight update drops them all (a completion that spans an update is never cached);
    * requests without a ``session_id`` neither use nor fill the cache; a request marked
      ``last_turn`` (no follow-up will come: a single-turn episode) uses it but does not fill
      it, which spares the copy of its rows' keys/values.

Reused keys/values equal recomputed ones up to float32 rounding (a decode step and a prefill
multiply differently shaped matrices), the same noise as a change of batch composition: token
ids stay the same, log-probs move by ~1e-7. Which requests hit depends only on each session's
own history -- so a replayed run hits the same way -- except when the budget evicts entries,
whose order depends on when sessions finish.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CachedPrefix", "PrefillCounts", "PrefixCache"]


@dataclass
class CachedPrefix:
    """One session's cached tokens and their keys/values.

    Attributes:
        token_ids: ``[length]`` long, the tokens whose keys/values are cached.
        keys, values: per layer ``[1, kv_heads, length, head_dim]``.
        version: the weight version that computed them.
    """

    token_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    version: int

    @property
    def length(self) -> int:
        return int(self.token_ids.numel())


@dataclass
class PrefillCounts:
    """Prompt tokens an engine prefilled: ``computed`` by a forward pass, ``reused`` from the
    prefix cache, ``shared`` from another request with the same prompt (and adapter) that
    joined the batch in the same step (a GRPO group's members: one prefill, every member's rows
    copy its keys/values), ``head`` from a head that distinct prompts joining in the same step
    begin with, computed once (``LocalEngine(shared_head_tokens=)``,
    ``areal_agents.engines.shared_head``). A request's ``n`` samples share one prefill and
    count once."""

    computed: int = 0
    reused: int = 0
    shared: int = 0
    head: int = 0


class PrefixCache:
    """Per-session LRU of ``CachedPrefix`` entries within a token budget (see the module doc).

    Args:
        max_tokens: cached tokens over all sessions at most; 0 disables the cache.

    Example:
        >>> cache = PrefixCache(max_tokens=100)
        >>> kv = [torch.zeros(1, 2, 4, 8)]
        >>> cache.put("s", [5, 6, 7, 8], kv, kv, version=0)
        >>> cache.get("s", [5, 6, 7, 9, 10], version=0)[0]  # reuse the 3 common tokens
        3
        >>> cache.get("s", [5, 6, 7, 8], version=0)[0]  # the last prompt token is computed
        3
        >>> cache.get("s", [5, 6], version=1)  # another weight version: a miss
        (0, None)
    """

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"PrefixCache.max_tokens must be >= 0 (0 disables it), got "
                             f"{max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._num_tokens = 0

    @property
    def num_tokens(self) -> int:
        """Tokens cached over all sessions."""
        return self._num_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str | None, prompt_ids: Sequence[int],
            version: int) -> tuple[int, CachedPrefix | None]:
        """``(reuse, entry)``: the first ``reuse`` tokens of ``prompt_ids`` have keys/values in
        ``entry`` (its first ``reuse`` positions); ``(0, None)`` on a miss."""
        entry = self._entries.get(session_id) if session_id is not None else None
        if entry is None or entry.version != version:
            return 0, None
        n = min(entry.length, len(prompt_ids) - 1)
        if n < 1:
            return 0, None
        prompt = torch.as_tensor(prompt_ids[:n], dtype=torch.long)
        reuse = int((prompt == entry.token_ids[:n]).cumprod(0).sum())
        if reuse < 1:
            return 0, None
        self._entries.move_to_end(session_id)
        return reuse, entry

    def put(self, session_id: str | None, token_ids: Sequence[int], keys: list[torch.Tensor],
            values: list[torch.Tensor], version: int) -> None:
        """Cache ``keys``/``values`` of ``token_ids`` as ``session_id``'s entry (replacing its
        previous one), then evict least recently used sessions beyond the budget."""
        if session_id is None or not token_ids or len(token_ids) > self.max_tokens:
            return
        self._drop(session_id)
        entry = CachedPrefix(torch.tensor(list(token_ids), dtype=torch.long), keys, values,
                             version)
        self._entries[session_id] = entry
        self._num_tokens += entry.length
        while self._num_tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Drop every entry (the weights changed)."""
        self._entries.clear()
        self._num_tokens = 0

    def _drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._num_tokens -= entry.length
