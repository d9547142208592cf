"""Negotiation-v0: two agents divide items they value privately (general-sum, several turns)."""

from __future__ import annotations

import functools
import itertools
import operator
import re
from collections.abc import Mapping
from typing import Any

from areal_agents.env import MultiAgentEnv
from areal_agents.messages import Message, parse_action, user

AGENTS = ["alice", "bob"]
ITEMS = ["book", "hat", "ball", "pen", "cup"]


@functools.lru_cache(maxsize=256)
def valuations(counts: tuple[int, ...], total: int) -> list[tuple[int, ...]]:
    """Every value vector (non-negative ints) that makes ``counts`` worth exactly ``total``."""
    ranges = [range(total // c + 1) for c in counts]
    return [v for v in itertools.product(*ranges) if sum(map(operator.mul, counts, v)) == total]


class Negotiation(MultiAgentEnv[list[Message], Message | str]):
    """Item division with private values: propose splits or accept, over several turns.

    There are ``num_types`` item types (1-``max_count`` of each); each agent privately values
    every type so that the whole pool is worth ``total`` to it. Agents alternate, "alice" first.
    A reply is ``propose: n1 n2 ...`` (how many of each type the proposer KEEPS; the last
    ``num_types`` integers count) or ``accept`` (takes the other's standing offer). The other
    sees the proposer's text (shortened) and the offer, last. On ``accept`` each agent gets
    the value of its share divided by ``total`` (in [0, 1]); if no deal is made within
    ``max_turns`` replies, both get 0. An invalid reply (too many items, nothing parseable,
    accept with no offer) wastes the turn and is reported to the other agent.

    Args:
        num_types: item types (1-5).
        max_count: most items of one type.
        total: each agent's value of the whole pool.
        max_turns: replies allowed in all.
    """

    def __init__(
        self, num_types: int = 3, max_count: int = 3, total: int = 10, max_turns: int = 6
    ) -> None:
        if not 1 <= num_types <= len(ITEMS) or max_count < 1 or total < 1 or max_turns < 1:
            raise ValueError(
                f"need 1 <= num_types <= {len(ITEMS)}, max_count >= 1, total >= 1, max_turns >= 1; "
                f"got {num_types}, {max_count}, {total}, {max_turns}"
            )
        self.num_types, self.max_count, self.total, self.max_turns = (
            num_types,
            max_count,
            total,
            max_turns,
        )
        self.possible_agents = list(AGENTS)
        self.agents: list[str] = []
        self.counts: list[int] = []
        self.values: dict[str, list[int]] = {}
        self.offer: tuple[str, list[int]] | None = None  # (proposer, what the proposer keeps)
        self.turn = 0

    def _describe(self, numbers: list[int]) -> str:
        return ", ".join(f"{n} {ITEMS[i]}" for i, n in enumerate(numbers))

    def _intro(self, agent: str) -> str:
        other = AGENTS[1 - AGENTS.index(agent)].capitalize()
        values = ", ".join(f"{ITEMS[i]} {v}" for i, v in enumerate(self.values[agent]))
        return (
            f"Divide {self._describe(self.counts)} with {other}. Your values: {values} (all: {self.total}). "
            f"{self.max_turns} replies in all, no deal scores 0. Reply 'propose: "
            f"{' '.join(f'<{ITEMS[i]}s>' for i in range(self.num_types))}' (what you keep) or 'accept'."
        )

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        rng = self.np_random
        while True:  # redraw counts that no valuation fits (e.g. 3 3 3 for a total of 10)
            self.counts = [int(c) for c in rng.integers(1, self.max_count + 1, size=self.num_types)]
            options = valuations(tuple(self.counts), self.total)
            if options:
                break
        self.values = {a: list(options[int(rng.integers(len(options)))]) for a in AGENTS}
        self.agents, self.offer, self.turn = list(AGENTS), None, 0
        infos = {a: {"values": list(self.values[a]), "counts": list(self.counts)} for a in AGENTS}
        return {"alice": [user(f"{self._intro('alice')}\nYour turn.")]}, infos

    def parse_reply(self, text: str | None, agent: str) -> list[int] | str:
        """``"accept"``, the kept counts of a proposal, or an error message."""
        text = text or ""
        if re.search(r"\baccept\b", text, re.IGNORECASE):
            if self.offer is None or self.offer[0] == agent:
                return "there is no offer from the other agent to accept"
            return "accept"
        numbers = [int(n) for n in re.findall(r"(?<!\d)\d{1,6}(?!\d)", text)][-self.num_types :]
        if len(numbers) < self.num_types:
            return f"no proposal found; reply 'propose:' and {self.num_types} numbers, or 'accept'"
        if any(n > c for n, c in zip(numbers, self.counts, strict=True)):
            return f"asked for more than there is ({self._describe(self.counts)})"
        return numbers

    def share_value(self, agent: str, kept: list[int]) -> int:
        """What ``kept`` (counts per type) is worth to ``agent``."""
        return sum(k * v for k, v in zip(kept, self.values[agent], strict=True))

    async def step(
        self, actions: Mapping[str, Message | str]
    ) -> tuple[
        dict[str, list[Message]],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        (agent,) = actions
        other = AGENTS[1 - AGENTS.index(agent)]
        text = (parse_action(actions[agent])["content"] or "").strip()
        reply = self.parse_reply(text, agent)
        self.turn += 1
        zeros, flags = dict.fromkeys(AGENTS, 0.0), dict.fromkeys(AGENTS, False)
        if reply == "accept":
            assert self.offer is not None
            proposer, kept = self.offer
            rest = [c - k for c, k in zip(self.counts, kept, strict=True)]
            shares = {proposer: kept, agent: rest}
            rewards = {a: self.share_value(a, shares[a]) / self.total for a in AGENTS}
            self.agents = []
            infos = {a: {"deal": True, "share": shares[a]} for a in AGENTS}
            return {}, rewards, dict.fromkeys(AGENTS, True), flags, infos
        if isinstance(reply, list):
            self.offer = (agent, reply)
            rest = [c - k for c, k in zip(self.counts, reply, strict=True)]
            news = f"Offer: you get {self._describe(rest)} (worth {self.share_value(other, rest)} to you)."
        else:
            news = f"Invalid reply ({reply})." + (
                "" if self.offer is None else " The last offer stands."
            )
        if self.turn >= self.max_turns:
            self.agents = []
            return (
                {},
                zeros,
                dict.fromkeys(AGENTS, True),
                flags,
                {a: {"deal": False} for a in AGENTS},
            )
        said = f"{agent.capitalize()}: {text[:120]}\n{news}"
        intro = [user(self._intro(other))] if self.turn == 1 else []
        infos = {a: {"reply": reply if isinstance(reply, str) else list(reply)} for a in AGENTS}
        return {other: [*intro, user(said)]}, zeros, flags, dict(flags), infos

    def sample_action(self, agent: str | None = None) -> str:
        """``accept`` (one time in five) or a random proposal within the counts."""
        rng = self.action_rng
        if rng.random() < 0.2:
            return "accept"
        return "propose: " + " ".join(
            str(rng.randint(0, c)) for c in (self.counts or [1] * self.num_types)
        )
