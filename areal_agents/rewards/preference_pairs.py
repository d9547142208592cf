"""Preference pairs for reward models: the ``PreferencePair`` record, JSONL files
(``read_pairs`` / ``write_pairs``) and pairs harvested from a run's scored episodes
(``pairs_from_episodes``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_agents.episode import Episode

Conversation = str | list[dict[str, Any]]
"""A prompt or response: plain text (one user / assistant message) or chat messages."""


@dataclass(frozen=True)
class PreferencePair:
    """``chosen`` is a better response to ``prompt`` than ``rejected``."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation


def conversation(prompt: Conversation, response: Conversation) -> list[dict[str, Any]]:
    """Chat messages of ``prompt`` then ``response`` (text becomes a user / assistant message)."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(response, str):
        return [*head, {"role": "assistant", "content": response}]
    return [*head, *response]


def _check_part(value: Any, key: str, where: str) -> Conversation:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise ValueError(f"{where}: {key!r} must be a string or a list of chat messages "
                     f"({{'role': ..., 'content': ...}}), got {type(value).__name__}")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Preference pairs of a JSONL file, one ``{"prompt", "chosen", "rejected"}`` per line.

    Each field is a string or a list of chat messages; ``prompt`` may be left out when
    ``chosen`` and ``rejected`` are whole conversations. Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad row or an empty file; the message starts with ``path:line``.
    """
    pairs = []
    for num, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{num}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing {missing}; a row is "
                             '{"prompt": ..., "chosen": ..., "rejected": ...}')
        prompt = _check_part(row.get("prompt", []), "prompt", where)
        pairs.append(PreferencePair(prompt, _check_part(row["chosen"], "chosen", where),
                                    _check_part(row["rejected"], "rejected", where)))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file")
    return pairs


def write_pairs(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write ``pairs`` as JSONL (the format ``read_pairs`` reads); returns ``path``."""
    rows = [json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            for p in pairs]
    Path(path).write_text("\n".join(rows) + "\n")
    return Path(path)


def last_turn(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str] | None:
    """``(messages before the last assistant message, its content)``; None without one."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[:i], messages[i].get("content") or ""
    return None


def pairs_from_episodes(episodes: Iterable[Episode], *, agent: str | None = None,
                        score: Callable[[Episode], float] | None = None,
                        min_margin: float = 0.0, max_pairs_per_group: int | None = None
                        ) -> list[PreferencePair]:
    """Preference pairs from scored episodes, per task seed: every better/worse pair of
    responses of ``agent`` to the same task.

    Args:
        episodes: finished episodes; those of one ``seed`` answer the same task.
        agent: whose last response is compared (default: the only agent of the episodes).
        score: ``episode -> float`` (a judge's label, ground truth...); default the agent's
            return.
        min_margin: a pair needs ``score(chosen) - score(rejected) > min_margin``.
        max_pairs_per_group: keep at most this many pairs per seed (largest margins first).

    Raises:
        ValueError: ``agent`` not given and the episodes have several agents.
    """
    groups: dict[Any, list[tuple[float, list[dict[str, Any]], str]]] = {}
    for ep in episodes:
        if agent is None and len(ep.agents) != 1:
            raise ValueError(f"episodes have agents {ep.agents}; name the one to compare "
                             "with agent=")
        who = agent or ep.agents[0]
        turn = last_turn(ep.messages.get(who, []))
        if ep.status == "failed" or turn is None:
            continue
        value = score(ep) if score is not None else ep.returns.get(who, 0.0)
        groups.setdefault(ep.seed, []).append((float(value), *turn))
    pairs = []
    for members in groups.values():
        found = {(a[2], b[2]): (a[0] - b[0], a[1]) for a in members for b in members
                 if a[0] - b[0] > min_margin and a[2] != b[2]}
        ranked = sorted(found.items(), key=lambda kv: -kv[1][0])[:max_pairs_per_group]
        pairs.extend(PreferencePair(prompt, c, r) for (c, r), (_, prompt) in ranked)
    return pairs


__all__ = ["Conversation", "PreferencePair", "conversation", "last_turn", "pairs_from_episodes",
           "read_pairs", "write_pairs"]
