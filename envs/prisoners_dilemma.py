"""PrisonersDilemma-v0: the iterated prisoner's dilemma with simultaneous moves."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from areal_agents.env import MultiAgentEnv
from areal_agents.messages import Message, parse_action, user

AGENTS = ["player_0", "player_1"]
# (my move, other's move) -> (my payoff, other's payoff)
DEFAULT_PAYOFFS: dict[str, tuple[float, float]] = {
    "CC": (3, 3),
    "CD": (0, 5),
    "DC": (5, 0),
    "DD": (1, 1),
}
_MOVE = re.compile(r"\b(c|d|cooperate|defect)\b", re.IGNORECASE)


def parse_move(text: str | None) -> str | None:
    """``"C"`` or ``"D"`` from the last ``C``/``D``/``cooperate``/``defect`` word, else None."""
    found = _MOVE.findall(text or "")
    return found[-1][0].upper() if found else None


class PrisonersDilemma(MultiAgentEnv[list[Message], Message | str]):
    """Iterated prisoner's dilemma: both players move at once each round (C or D).

    Every step both agents are in ``obs`` and act simultaneously. Each replies ``C``/``D``
    (or ``cooperate``/``defect``; the last such word counts). Each round pays
    ``payoffs[my_move + other_move][0]`` to each player (default T=5, R=3, P=1, S=0). A reply
    without a move scores 0 for its sender that round and counts as ``C`` for the other's payoff.
    The prompt of each round ends with the other's last move. The episode ends after
    ``rounds`` rounds.

    Args:
        rounds: rounds per episode.
        payoffs: ``{"CC": (mine, other's), "CD": ..., "DC": ..., "DD": ...}`` from the mover's
            view; must be symmetric (``payoffs["CD"] == payoffs["DC"][::-1]``).

    Example:
        >>> import asyncio
        >>> env = PrisonersDilemma(rounds=2)
        >>> obs, _ = asyncio.run(env.reset(seed=0))
        >>> sorted(obs)
        ['player_0', 'player_1']
        >>> obs, rewards, *_ = asyncio.run(env.step({"player_0": "C", "player_1": "defect"}))
        >>> rewards, obs["player_0"][0]["content"]
        ({'player_0': 0.0, 'player_1': 5.0}, "Round 2 of 2. You got 0. Other's last move: D")
    """

    def __init__(self, rounds: int = 5, payoffs: Mapping[str, Any] | None = None) -> None:
        table = dict(DEFAULT_PAYOFFS if payoffs is None else payoffs)
        if set(table) != set(DEFAULT_PAYOFFS):
            raise ValueError(f"payoffs needs exactly the keys CC, CD, DC, DD, got {sorted(table)}")
        self.payoffs = {k: (float(v[0]), float(v[1])) for k, v in table.items()}
        for key, (mine, other) in self.payoffs.items():
            if self.payoffs[key[::-1]] != (other, mine):
                raise ValueError(
                    f"payoffs must be symmetric: {key}={table[key]} vs {key[::-1]}={table[key[::-1]]}"
                )
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = rounds
        self.possible_agents = list(AGENTS)
        self.agents: list[str] = []
        self.round = 0
        self.history: list[tuple[str | None, str | None]] = []

    def _intro(self) -> str:
        p = self.payoffs
        table = ", ".join(f"you {k[0]} other {k[1]}: {p[k][0]:g}" for k in ("CC", "CD", "DC", "DD"))
        return f"Repeated game, {self.rounds} rounds, both move at once. Your points: {table}. Reply C or D."

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        self.agents, self.round, self.history = list(AGENTS), 0, []
        first = f"{self._intro()}\nRound 1 of {self.rounds}."
        return {a: [user(first)] for a in AGENTS}, {a: {} for a in AGENTS}

    async def step(
        self, actions: Mapping[str, Message | str]
    ) -> tuple[
        dict[str, list[Message]],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        moves = [parse_move(parse_action(actions[a])["content"]) for a in AGENTS]
        rewards: dict[str, float] = {}
        for i, agent in enumerate(AGENTS):
            mine, theirs = moves[i], moves[1 - i] or "C"
            rewards[agent] = 0.0 if mine is None else self.payoffs[mine + theirs][0]
        self.history.append((moves[0], moves[1]))
        self.round += 1
        infos = {
            a: {"moves": dict(zip(AGENTS, moves, strict=True)), "round": self.round} for a in AGENTS
        }
        done = self.round >= self.rounds
        if done:
            self.agents = []
        obs = (
            {}
            if done
            else {
                a: [
                    user(
                        f"Round {self.round + 1} of {self.rounds}. You got {rewards[a]:g}. "
                        f"Other's last move: {moves[1 - i] or 'none'}"
                    )
                ]
                for i, a in enumerate(AGENTS)
            }
        )
        return obs, rewards, dict.fromkeys(AGENTS, done), dict.fromkeys(AGENTS, False), infos

    def sample_action(self, agent: str | None = None) -> str:
        """``"C"`` or ``"D"`` at random."""
        return self.action_rng.choice(["C", "D"])
