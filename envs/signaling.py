"""Signaling-v0: a referential game — a speaker names a target, a listener picks it."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from areal_agents.env import MultiAgentEnv
from areal_agents.messages import Message, parse_action, user

AGENTS = ["speaker", "listener"]


class Signaling(MultiAgentEnv[list[Message], Message | str]):
    """Referential game: the speaker sends a short code for a target, the listener picks it.

    Each round has two turns. The speaker sees the candidate items and the target (last line
    ``target: C``) and replies; its reply is read as the first ``message_length`` characters
    that belong to the vocabulary (digits ``0``-``9`` when ``vocab_size <= 10``, else lowercase
    letters). The listener sees the same candidates in its own random order and the message
    (last line) and replies with an item name (upper-case letter) or its 1-based position in
    its list. Both get reward 1.0 when the listener picks the target, else 0.0. Candidates are
    drawn from the first ``pool_size`` letters each round; a new round reports the last result.

    Args:
        num_items: candidates per round (2-26).
        vocab_size: number of message symbols (2-26); default ``num_items``.
        message_length: symbols per message.
        rounds: rounds per episode.
        pool_size: letters the candidates are drawn from; default ``num_items``.

    Example:
        >>> import asyncio
        >>> env = Signaling()
        >>> obs, _ = asyncio.run(env.reset(seed=0))
        >>> obs["speaker"][0]["content"].splitlines()[-1]
        'target: B'
        >>> obs, *_ = asyncio.run(env.step({"speaker": "1"}))
        >>> obs["listener"][0]["content"].splitlines()[-1]
        'message: 1'
        >>> asyncio.run(env.step({"listener": "B"}))[1]
        {'speaker': 1.0, 'listener': 1.0}
    """

    possible_agents = AGENTS

    def __init__(
        self,
        num_items: int = 4,
        vocab_size: int | None = None,
        message_length: int = 1,
        rounds: int = 1,
        pool_size: int | None = None,
    ) -> None:
        self.num_items = num_items
        self.vocab_size = num_items if vocab_size is None else vocab_size
        self.pool_size = num_items if pool_size is None else pool_size
        if not 2 <= num_items <= self.pool_size <= 26:
            raise ValueError(
                f"need 2 <= num_items <= pool_size <= 26, got {num_items}, {self.pool_size}"
            )
        if not 2 <= self.vocab_size <= 26 or message_length < 1 or rounds < 1:
            raise ValueError(
                f"need 2 <= vocab_size <= 26, message_length >= 1, rounds >= 1; "
                f"got {self.vocab_size}, {message_length}, {rounds}"
            )
        self.message_length, self.rounds = message_length, rounds
        self.possible_agents = list(AGENTS)
        alphabet = string.digits if self.vocab_size <= 10 else string.ascii_lowercase
        self.vocab = alphabet[: self.vocab_size]
        self.agents: list[str] = []
        self.round = 0
        self.items: list[str] = []
        self.listener_items: list[str] = []
        self.target = ""
        self.message = ""
        self._last_result: list[Message] = []

    def _new_round(self) -> None:
        rng = self.np_random
        pool = list(string.ascii_uppercase[: self.pool_size])
        self.items = [pool[i] for i in rng.choice(len(pool), size=self.num_items, replace=False)]
        self.listener_items = [self.items[i] for i in rng.permutation(self.num_items)]
        self.target = self.items[int(rng.integers(self.num_items))]
        symbols = f"{self.vocab[0]}-{self.vocab[-1]}"
        self._speaker_prompt = (
            f"Items: {' '.join(self.items)}. Send {self.message_length} symbol(s) from "
            f"{symbols} so the listener picks the target.\ntarget: {self.target}"
        )

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        self.agents = list(AGENTS)
        self.round = 0
        self._last_result = []
        self._new_round()
        return {"speaker": [user(self._speaker_prompt)]}, {a: {"round": 0} for a in AGENTS}

    def parse_message(self, text: str | None) -> str:
        """The message the listener sees: the first ``message_length`` vocabulary symbols."""
        return "".join(ch for ch in (text or "") if ch in self.vocab)[: self.message_length]

    def parse_choice(self, text: str | None) -> str | None:
        """The listener's pick: the whole reply or its last word naming a candidate, else a
        1-based position in the listener's list; None when neither is found."""
        text = (text or "").strip()
        if text.rstrip(".") in self.items:
            return text.rstrip(".")
        names = [w for w in re.findall(r"\b[A-Z]\b", text) if w in self.items]
        if names:
            return names[-1]
        positions = [
            int(n)
            for n in re.findall(r"(?<!\d)\d{1,3}(?!\d)", text)
            if 1 <= int(n) <= self.num_items
        ]
        return self.listener_items[positions[-1] - 1] if positions else None

    async def step(
        self, actions: Mapping[str, Message | str]
    ) -> tuple[
        dict[str, list[Message]],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        zeros = dict.fromkeys(AGENTS, 0.0)
        flags = dict.fromkeys(AGENTS, False)
        if "speaker" in actions:
            self.message = self.parse_message(parse_action(actions["speaker"])["content"])
            prompt = (
                f"Items: {' '.join(self.listener_items)}. The speaker sent a code "
                f"(symbols {self.vocab[0]}-{self.vocab[-1]}) for one item. Reply with that item.\n"
                f"message: {self.message or '(none)'}"
            )
            infos = {a: {"message": self.message} for a in AGENTS}
            obs = {"listener": [*self._last_result, user(prompt)]}
            return obs, zeros, flags, dict(flags), infos
        choice = self.parse_choice(parse_action(actions["listener"])["content"])
        success = choice == self.target
        rewards = dict.fromkeys(AGENTS, float(success))
        infos = {a: {"choice": choice, "target": self.target, "success": success} for a in AGENTS}
        self.round += 1
        if self.round >= self.rounds:
            self.agents = []
            return {}, rewards, dict.fromkeys(AGENTS, True), flags, infos
        self._last_result = [
            user(
                f"Round {self.round}: target {self.target}, listener picked {choice or 'nothing'}."
            )
        ]
        self._new_round()
        return (
            {"speaker": [*self._last_result, user(self._speaker_prompt)]},
            rewards,
            flags,
            dict(flags),
            infos,
        )

    def sample_action(self, agent: str | None = None) -> str:
        """Speaker: random symbols; listener: a random candidate name."""
        rng = self.action_rng
        if agent == "speaker":
            return "".join(rng.choice(self.vocab) for _ in range(self.message_length))
        return rng.choice(self.listener_items or ["A"])
