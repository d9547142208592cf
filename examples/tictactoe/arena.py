"""TicTacToe against scripted opponents: a one-seat env and a greedy win/draw/loss evaluation.

``VsScripted`` turns ``TicTacToe`` into an env with a single agent, ``"player"``: on each
``reset(seed=...)`` it draws the player's seat (X or O) and its opponent from a pool of
scripted players, both from the seeded generator, so all episodes of a GRPO group (one seed)
face the same seat, opponent and opening. The opponent's moves are made inside the env.

``evaluate_vs`` plays a trained policy greedily (through the trainer's gateway) against one
scripted opponent in one seat on held-out seeds and counts wins, draws and losses.

The Trainer now has both built in: ``Trainer(opponents=OpponentPool(...))`` draws the opponent
per task seed in the multi-agent env itself (``train_pool.py``), and
``trainer.evaluate(seeds, opponents=[...], seats=[...])`` plays greedy games against named
opponents. ``compare.py`` keeps this arena so that its measured table below stays reproducible
(it also counts losses by illegal moves, which ``evaluate`` does not).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from areal_agents.agents.players import tictactoe_heuristic, tictactoe_minimax
from areal_agents.env import MultiAgentEnv
from areal_agents.envs.tictactoe import TicTacToe
from areal_agents.episode import run_episode

Player = Callable[[Any], str]
SEATS = ("x", "o")
RANDOM = "random"
PLAYERS: dict[str, Player | str] = {
    RANDOM: RANDOM,  # a uniformly random empty cell, drawn from the env's seeded generator
    "heuristic": tictactoe_heuristic,
    "minimax": tictactoe_minimax,
}
"""Opponent names usable in ``VsScripted(opponents=...)``."""


class VsScripted(MultiAgentEnv[list[dict[str, Any]], Any]):
    """TicTacToe for one agent ``"player"`` against a scripted opponent drawn per episode.

    Args:
        opponents: names from ``PLAYERS`` (the pool; one is drawn uniformly per episode).
        seats: the seats the player may take (one is drawn uniformly per episode).
        opening_moves: random opening moves before play (0-2; see ``TicTacToe``).
        illegal, max_reasks: ``TicTacToe``'s illegal-move rule (default: re-ask twice).

    Infos at the end carry ``seat``, ``opponent`` and ``outcome`` ("win", "draw", "loss").
    Rewards are the player's TicTacToe rewards (+1 win, 0 draw, -1 loss or illegal move).

    Raises:
        ValueError: an unknown opponent or seat, or ``opening_moves`` outside 0..2 (more could
            let the opponent complete a line before the player's first move).
    """

    possible_agents = ["player"]  # noqa: RUF012

    def __init__(self, opponents: Sequence[str] = (RANDOM, "heuristic"),
                 seats: Sequence[str] = SEATS, opening_moves: int = 0,
                 illegal: str = "reask", max_reasks: int = 2) -> None:
        unknown = sorted(set(opponents) - set(PLAYERS))
        if unknown or not opponents:
            raise ValueError(f"unknown opponents {unknown or list(opponents)}; choose from "
                             f"{sorted(PLAYERS)}")
        if not seats or set(seats) - set(SEATS):
            raise ValueError(f"seats must be a non-empty subset of {SEATS}, got {seats!r}")
        if not 0 <= opening_moves <= 2:
            raise ValueError(f"opening_moves must be in 0..2, got {opening_moves}")
        self.opponents, self.seats = list(opponents), list(seats)
        self.game = TicTacToe(illegal=illegal, max_reasks=max_reasks,  # type: ignore[arg-type]
                              opening_moves=opening_moves)
        self.agents: list[str] = []
        self.seat, self.opponent = "x", self.opponents[0]

    def _opponent_move(self, observation: Any) -> str:
        player = PLAYERS[self.opponent]
        if player == RANDOM:
            empty = [str(i + 1) for i, c in enumerate(self.game.board) if c == "."]
            return empty[int(self.np_random.integers(len(empty)))]
        assert callable(player)
        return player(observation)

    async def _until_player(self, obs: Mapping[str, Any]) -> tuple[Any, float, bool, dict]:
        """Let the opponent move while it is its turn; ``(player obs, reward, done, info)``."""
        other = SEATS[1 - SEATS.index(self.seat)]
        while other in obs:
            obs, rewards, _, _, infos = await self.game.step(
                {other: self._opponent_move(obs[other])})
            if not self.game.agents:
                return None, rewards.get(self.seat, 0.0), True, infos.get(self.seat, {})
        return obs[self.seat], 0.0, False, {}

    def _end_info(self, reward: float, info: dict[str, Any]) -> dict[str, Any]:
        outcome = "win" if reward > 0 else "loss" if reward < 0 else "draw"
        return {**info, "seat": self.seat, "opponent": self.opponent, "outcome": outcome}

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        self.seat = self.seats[int(self.np_random.integers(len(self.seats)))]
        self.opponent = self.opponents[int(self.np_random.integers(len(self.opponents)))]
        # the game gets its own seed from this generator: same-seed generators would correlate
        # the seat/opponent draws with the opening
        obs, _ = await self.game.reset(seed=int(self.np_random.integers(2**31)))
        first, _, done, _ = await self._until_player(obs)
        assert not done, "the opponent cannot win before the player's first move"
        self.agents = ["player"]
        info = {"seat": self.seat, "opponent": self.opponent}
        return {"player": first}, {"player": info}

    async def step(self, actions: Mapping[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        obs, rewards, _, _, infos = await self.game.step({self.seat: actions["player"]})
        reward, done, info = rewards.get(self.seat, 0.0), not self.game.agents, infos.get(self.seat, {})
        if not done:
            nxt, reward, done, info = await self._until_player(obs)
        if done:
            self.agents = []
            return ({}, {"player": reward}, {"player": True}, {"player": False},
                    {"player": self._end_info(reward, info)})
        return {"player": nxt}, {"player": 0.0}, {"player": False}, {"player": False}, {"player": {}}

    def sample_action(self, agent: str | None = None) -> str:
        """A random empty cell (the warm start's format-only demonstrations)."""
        return self.game.sample_action(self.seat)


async def evaluate_vs(trainer: Any, policy: str, opponent: str, seat: str, seeds: Sequence[int],
                      opening_moves: int = 2) -> dict[str, float]:
    """Greedy games of ``trainer``'s policy ``policy`` in ``seat`` against ``opponent``.

    Uses the trainer's gateway (its current weights); the games are not trained on.

    Returns:
        ``{"win", "draw", "loss", "illegal", "games"}``: rates over ``len(seeds)`` games
        (win + draw + loss == 1; ``illegal`` counts the losses by an illegal move).

    Raises:
        ValueError: no seeds, or an unknown policy/opponent/seat.
        RuntimeError: an episode failed (the env's or the agent's error).
    """
    from areal_agents.trainers.llm_session import open_seat

    if not seeds:
        raise ValueError("evaluate_vs needs at least one seed")
    if policy not in trainer.policies:
        raise ValueError(f"unknown policy {policy!r}; trainer policies: {sorted(trainer.policies)}")
    await trainer.setup()
    client = trainer.gateway.async_client()

    async def one(seed: int) -> dict[str, Any]:
        env = VsScripted([opponent], [seat], opening_moves)
        player = await open_seat(trainer.gateway, client, trainer.policies[policy], policy,
                                 "player", greedy=True)
        try:
            episode = await run_episode(env, {"player": player.agent}, seed=seed)
        finally:
            player.close()  # not trained on: the session is dropped
        if episode.status == "failed":
            raise RuntimeError(f"eval episode seed={seed} failed: {episode.error}")
        return episode.infos["player"]

    infos = await asyncio.gather(*(one(s) for s in seeds))
    n = len(infos)
    rates = {k: sum(i["outcome"] == k for i in infos) / n for k in ("win", "draw", "loss")}
    rates["illegal"] = sum("illegal" in i for i in infos) / n
    rates["games"] = float(n)
    return rates
