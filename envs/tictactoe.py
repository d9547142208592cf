"""TicTacToe-v0: turn-based two-player tic-tac-toe with penalised (or re-asked) illegal moves."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from areal_agents.env import MultiAgentEnv
from areal_agents.messages import Message, parse_action, user

AGENTS = ["x", "o"]
LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def winner(board: str) -> str | None:
    """``"X"`` or ``"O"`` if that mark owns a line of the 9-cell ``board``, else None."""
    for a, b, c in LINES:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return board[a]
    return None


def render(board: str) -> str:
    """Three rows of ``X``, ``O`` and ``.``."""
    return "\n".join(board[i : i + 3] for i in (0, 3, 6))


class TicTacToe(MultiAgentEnv[list[Message], Message | str]):
    """Tic-tac-toe for agents "x" (moves first) and "o"; illegal moves penalised or re-asked.

    Each turn the player to move sees the opponent's last move and the board (last, three rows
    of ``X``/``O``/``.``) and replies with a cell number 1-9 (row by row; the last such digit in
    the reply counts). A win gives +1 to the winner and -1 to the loser; a draw 0 to both.
    An illegal move (no cell number, or an occupied cell) gives the mover -1 (the opponent 0)
    and ends the game with ``illegal="penalty"``; with ``illegal="reask"`` the mover is asked
    again, and after ``max_reasks`` illegal moves in a row it is penalised the same way.

    Args:
        illegal: ``"penalty"`` or ``"reask"``.
        max_reasks: illegal replies tolerated in a row with ``"reask"``.
        opening_moves: up to this many random moves (0-4; the count is uniform in
            ``0..opening_moves``, the cells uniform among the empty ones, both drawn from the
            generator seeded by ``reset(seed=...)``) are made before the first prompt, so that
            deterministic (greedy, scripted) players meet varied positions across seeds; the
            player to move then gets the first prompt. 0 (default) always starts empty.
        list_free: also list the empty cells in every prompt (``Free:1,3,4.``, before the
            board), so that a small model can copy a legal move instead of reading the grid.

    Example:
        >>> import asyncio
        >>> env = TicTacToe()
        >>> _ = asyncio.run(env.reset(seed=0))
        >>> obs, *_ = asyncio.run(env.step({"x": "5"}))
        >>> print(obs["o"][0]["content"].split(". ", 3)[-1])
        Opponent played 5. You are O. Board:
        ...
        .X.
        ...
    """

    def __init__(
        self,
        illegal: Literal["penalty", "reask"] = "penalty",
        max_reasks: int = 2,
        opening_moves: int = 0,
        list_free: bool = False,
    ) -> None:
        if illegal not in ("penalty", "reask"):
            raise ValueError(f"illegal must be 'penalty' or 'reask', got {illegal!r}")
        if max_reasks < 0:
            raise ValueError(f"max_reasks must be >= 0, got {max_reasks}")
        if not 0 <= opening_moves <= 4:
            raise ValueError(f"opening_moves must be in 0..4 (no line can be completed), got "
                             f"{opening_moves}")
        self.illegal, self.max_reasks = illegal, max_reasks
        self.opening_moves, self.list_free = opening_moves, list_free
        self.possible_agents = list(AGENTS)
        self.agents: list[str] = []
        self.board = "." * 9
        self.to_move = "x"
        self.reasks = 0
        self._started: set[str] = set()

    def _prompt(self, agent: str, news: str) -> Message:
        mark = agent.upper()
        intro = (
            ""
            if agent in self._started
            else (
                "Tic-tac-toe. Cells are numbered 1-9 row by row. Reply with the number of an empty "
                "cell (.). "
            )
        )
        self._started.add(agent)
        if self.list_free:
            # no spaces: "Free:2,3,9." tokenizes each cell as the bare digit a move is
            news += "Free:" + ",".join(str(i + 1) for i, c in enumerate(self.board) if c == ".")
            news += ". "
        return user(f"{intro}{news}You are {mark}. Board:\n{render(self.board)}")

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        self.agents = list(AGENTS)
        self.board, self.to_move, self.reasks = "." * 9, "x", 0
        self._started = set()
        news = ""
        if self.opening_moves:
            for _ in range(int(self.np_random.integers(self.opening_moves + 1))):
                empty = [i for i, c in enumerate(self.board) if c == "."]
                cell = empty[int(self.np_random.integers(len(empty)))]
                mark = self.to_move.upper()
                self.board = self.board[:cell] + mark + self.board[cell + 1 :]
                self.to_move = AGENTS[1 - AGENTS.index(self.to_move)]
                news = f"Opponent played {cell + 1}. "
        first = self.to_move
        return {first: [self._prompt(first, news)]}, {a: {} for a in AGENTS}

    @staticmethod
    def parse_move(text: str | None) -> int | None:
        """The 0-based cell of the last standalone digit 1-9 in ``text``, or None."""
        digits = re.findall(r"(?<!\d)[1-9](?!\d)", text or "")
        return int(digits[-1]) - 1 if digits else None

    def _end(self, rewards: dict[str, float], infos: dict[str, Any]) -> tuple[Any, ...]:
        self.agents = []
        return (
            {},
            rewards,
            dict.fromkeys(AGENTS, True),
            dict.fromkeys(AGENTS, False),
            {a: dict(infos) for a in AGENTS},
        )

    async def step(
        self, actions: Mapping[str, Message | str]
    ) -> tuple[
        dict[str, list[Message]],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        agent = self.to_move
        other = AGENTS[1 - AGENTS.index(agent)]
        cell = self.parse_move(parse_action(actions[agent])["content"])
        zeros, flags = dict.fromkeys(AGENTS, 0.0), dict.fromkeys(AGENTS, False)
        if cell is None or self.board[cell] != ".":
            reason = "no cell number 1-9" if cell is None else f"cell {cell + 1} is taken"
            if self.illegal == "reask" and self.reasks < self.max_reasks:
                self.reasks += 1
                obs = {agent: [self._prompt(agent, f"Illegal move: {reason}. Try again. ")]}
                return obs, zeros, flags, dict(flags), {a: {"illegal": reason} for a in AGENTS}
            return self._end({agent: -1.0, other: 0.0}, {"illegal": reason, "loser": agent})
        self.reasks = 0
        self.board = self.board[:cell] + agent.upper() + self.board[cell + 1 :]
        if winner(self.board):
            return self._end({agent: 1.0, other: -1.0}, {"winner": agent, "board": self.board})
        if "." not in self.board:
            return self._end(zeros, {"winner": None, "board": self.board})
        self.to_move = other
        obs = {other: [self._prompt(other, f"Opponent played {cell + 1}. ")]}
        return obs, zeros, flags, dict(flags), {a: {"board": self.board} for a in AGENTS}

    def render(self) -> str:
        """The board as three rows of text."""
        return render(self.board)

    def sample_action(self, agent: str | None = None) -> str:
        """A random empty cell (1-9)."""
        empty = [str(i + 1) for i, c in enumerate(self.board) if c == "."]
        return self.action_rng.choice(empty or ["1"])
