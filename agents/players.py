"""Scripted players for the built-in envs: optimal or heuristic policies for tests and baselines.

Each player reads the observation TEXT the way an LLM would (no access to env internals) and
returns an action (a string; an assistant message dict for tool calls); wrap it as
``ScriptedAgent(player)``. Stateless players are functions; players that need memory across
turns are small classes whose instances are callable and reset themselves when they see a new
task (use one instance per seat and concurrent episode).

Example:
    >>> countdown_solver([{"role": "user", "content": "Numbers: 2 3 7. ...\\nTarget: 21"}])
    'Answer: (3 * 7)'
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from areal_agents.envs._expr import ExprError, evaluate, extract_answer, format_number
from areal_agents.envs.countdown import check as check_countdown


def _text(observation: Any) -> str:
    """All message contents of an observation (list of messages, one message or a str)."""
    if isinstance(observation, str):
        return observation
    if isinstance(observation, dict):
        observation = [observation]
    return "\n".join(str(m.get("content") or "") for m in observation)


def _last(pattern: str, text: str, flags: int = 0) -> re.Match[str] | None:
    found = list(re.finditer(pattern, text, flags))
    return found[-1] if found else None


# --- Countdown -------------------------------------------------------------------------------


def solve_countdown(numbers: Iterable[int], target: int) -> str | None:
    """An expression over ``numbers`` (each at most once) equal to ``target``, or None."""
    goal = Fraction(target)
    seen: set[tuple[Fraction, ...]] = set()

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        for value, expr in items:
            if value == goal:
                return expr
        key = tuple(sorted(v for v, _ in items))
        if len(items) < 2 or key in seen:
            return None
        seen.add(key)
        for (i, (a, ea)), (j, (b, eb)) in itertools.combinations(enumerate(items), 2):
            rest = [it for k, it in enumerate(items) if k not in (i, j)]
            options = [
                (a + b, f"({ea} + {eb})"),
                (a * b, f"({ea} * {eb})"),
                (a - b, f"({ea} - {eb})"),
                (b - a, f"({eb} - {ea})"),
            ]
            if b != 0:
                options.append((a / b, f"({ea} / {eb})"))
            if a != 0:
                options.append((b / a, f"({eb} / {ea})"))
            for option in options:
                found = search([*rest, option])
                if found is not None:
                    return found
        return None

    return search([(Fraction(n), str(n)) for n in numbers])


def countdown_solver(observation: Any) -> str:
    """Optimal Countdown player: exhaustive search over the numbers in the task text."""
    text = _text(observation)
    numbers = _last(r"Numbers:\s*([\d ]+)", text)
    target = _last(r"Target:\s*(\d+)", text)
    if numbers is None or target is None:
        return "Answer: 0"
    expr = solve_countdown([int(n) for n in numbers.group(1).split()], int(target.group(1)))
    if expr is None:
        return "Answer: 0"
    return f"Answer: {expr}"


# --- Arithmetic ------------------------------------------------------------------------------


def arithmetic_solver(observation: Any) -> str:
    """Optimal Arithmetic player: evaluates the last ``<expression> = ?`` line exactly."""
    question = _last(r"^(.+?)\s*=\s*\?\s*$", _text(observation), re.MULTILINE)
    try:
        value = evaluate(question.group(1)) if question else Fraction(0)
    except ExprError:
        value = Fraction(0)
    return f"Answer: {format_number(value)}"


# --- Dataset (arithmetic questions) ----------------------------------------------------------

_EXPRESSION = re.compile(r"[\d(][\d\s.()]*(?:[-+*/][\d\s.()]*)+[\d)]")


def math_expression_solver(observation: Any) -> str:
    """Dataset-v0 player for arithmetic questions (``What is 7 - 9?``): evaluates the last
    arithmetic expression of the prompt exactly (``Answer: 0`` when there is none).

    Example:
        >>> math_expression_solver("What is 7 - 9?"), math_expression_solver("What is (2 + 4) / 4?")
        ('Answer: -2', 'Answer: 3/2')
    """
    found = _last(_EXPRESSION.pattern, _text(observation))
    try:
        value = evaluate(found.group(0)) if found else Fraction(0)
    except ExprError:
        value = Fraction(0)
    return f"Answer: {format_number(value)}"


# --- GuessNumber -----------------------------------------------------------------------------


class GuessNumberBisect:
    """Optimal GuessNumber player: bisects the range using the Higher/Lower feedback.

    Stateful (remembers the range); a new task message resets it. Use one instance per
    concurrent episode: ``ScriptedAgent(GuessNumberBisect())``.
    """

    def __init__(self) -> None:
        self.low, self.high, self.guess = 0, 0, 0

    def __call__(self, observation: Any) -> str:
        text = _text(observation)
        task = _last(r"number from (-?\d+) to (-?\d+)", text)
        if task is not None and "thinking of" in text:
            self.low, self.high = int(task.group(1)), int(task.group(2))
        elif "Higher" in text:
            self.low = self.guess + 1
        elif "Lower" in text:
            self.high = self.guess - 1
        self.guess = (self.low + self.high) // 2
        return str(self.guess)


# --- Calculator ------------------------------------------------------------------------------


def calculator_player(observation: Any) -> dict[str, Any]:
    """Optimal Calculator player: calls the tool on the question, then answers its result."""
    messages = [observation] if isinstance(observation, dict) else list(observation)
    results = [m for m in messages if m.get("role") == "tool"]
    if results and not str(results[-1].get("content", "")).startswith("error"):
        return {"role": "assistant", "content": f"Answer: {results[-1]['content']}"}
    question = _last(r"What is (.+)\?", _text(messages))
    expression = question.group(1) if question else "0"
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


# --- Signaling -------------------------------------------------------------------------------


def _signaling_code(text: str) -> tuple[list[str], str, int]:
    """``(sorted item names, vocabulary, message length)`` from a Signaling prompt."""
    items = _last(r"Items: ([A-Z ]+)\.", text)
    spec = _last(r"Send (\d+) symbol\(s\) from (\w)-(\w)", text)
    vocab = "0123456789abcdefghijklmnopqrstuvwxyz"
    if spec is not None:
        vocab = vocab[vocab.index(spec.group(2)) : vocab.index(spec.group(3)) + 1]
    return sorted(items.group(1).split()) if items else [], vocab, int(spec.group(1)) if spec else 1


def signaling_speaker(observation: Any) -> str:
    """Optimal speaker: the target's position among the sorted items, in base ``len(vocab)``.

    Pairs with ``signaling_listener`` (a fixed shared protocol, the best a learned pair can do
    when ``vocab_size ** message_length >= num_items``).
    """
    text = _text(observation)
    items, vocab, length = _signaling_code(text)
    target = _last(r"target: ([A-Z])", text)
    index = items.index(target.group(1)) if target and target.group(1) in items else 0
    digits = []
    for _ in range(length):
        index, digit = divmod(index, len(vocab))
        digits.append(vocab[digit])
    return "".join(reversed(digits))


def signaling_listener(observation: Any) -> str:
    """Optimal listener for ``signaling_speaker``: decodes the message to a sorted position."""
    text = _text(observation)
    items = _last(r"Items: ([A-Z ]+)\.", text)
    message = _last(r"message: (\S*)", text)
    spec = _last(r"symbols (\w)-(\w)", text)
    names = sorted(items.group(1).split()) if items else ["A"]
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    vocab = (
        alphabet[alphabet.index(spec.group(1)) : alphabet.index(spec.group(2)) + 1]
        if spec
        else "0123456789"
    )
    index = 0
    for ch in message.group(1) if message else "":
        index = index * len(vocab) + vocab.index(ch) if ch in vocab else index
    return names[index] if index < len(names) else names[0]


# --- TicTacToe -------------------------------------------------------------------------------

_LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


@functools.cache
def _minimax(board: str, mark: str) -> tuple[int, int]:
    """``(score, cell)`` for ``mark`` to move: +10 - depth for a win, 0 draw, negative loss."""
    other = "O" if mark == "X" else "X"
    best = (-100, -1)
    for cell in (i for i, c in enumerate(board) if c == "."):
        after = board[:cell] + mark + board[cell + 1 :]
        if any(after[a] == after[b] == after[c] == mark for a, b, c in _LINES):
            score = 10
        elif "." not in after:
            score = 0
        else:
            value = -_minimax(after, other)[0]
            score = value - (value > 0) + (value < 0)  # prefer quick wins and slow losses
        if score > best[0]:
            best = (score, cell)
    return best


def tictactoe_minimax(observation: Any) -> str:
    """Optimal TicTacToe player (never loses): minimax over the board in the last prompt."""
    text = _text(observation)
    mark = _last(r"You are ([XO])", text)
    rows = re.findall(r"^([XO.]{3})$", text, re.MULTILINE)[-3:]
    board = "".join(rows) if len(rows) == 3 else "." * 9
    if "." not in board:
        return "1"
    return str(_minimax(board, mark.group(1) if mark else "X")[1] + 1)


def _read_board(observation: Any) -> tuple[str, str]:
    """``(board, mark)`` from the last TicTacToe prompt (empty board and ``X`` if unreadable)."""
    text = _text(observation)
    mark = _last(r"You are ([XO])", text)
    rows = re.findall(r"^([XO.]{3})$", text, re.MULTILINE)[-3:]
    return ("".join(rows) if len(rows) == 3 else "." * 9), (mark.group(1) if mark else "X")


def tictactoe_heuristic(observation: Any) -> str:
    """Heuristic TicTacToe player (beatable, no look-ahead): complete a line of its own, else
    block the opponent's, else take the centre, else the first free corner, else the first
    free cell. Deterministic."""
    board, mark = _read_board(observation)
    other = "O" if mark == "X" else "X"
    empty = [i for i, c in enumerate(board) if c == "."]
    if not empty:
        return "1"
    for who in (mark, other):
        for a, b, c in _LINES:
            line = [board[a], board[b], board[c]]
            if line.count(who) == 2 and line.count(".") == 1:
                return str((a, b, c)[line.index(".")] + 1)
    for cell in (4, 0, 2, 6, 8):
        if board[cell] == ".":
            return str(cell + 1)
    return str(empty[0] + 1)


# --- PrisonersDilemma ------------------------------------------------------------------------


def pd_tit_for_tat(observation: Any) -> str:
    """Tit-for-tat: cooperate first, then copy the other's last move (``none`` counts as C)."""
    last = _last(r"Other's last move: (\w+)", _text(observation))
    return "D" if last and last.group(1) == "D" else "C"


def pd_always_defect(observation: Any) -> str:
    """Always defect (the one-shot dominant strategy)."""
    return "D"


def pd_always_cooperate(observation: Any) -> str:
    """Always cooperate."""
    return "C"


# --- Negotiation -----------------------------------------------------------------------------


class NegotiationFair:
    """Heuristic Negotiation player: asks for about half its total value, conceding 1 per turn.

    Accepts an offer worth at least its current threshold (``ceil(total / 2)`` minus its
    replies so far, at least 1); otherwise proposes to keep the fewest items (most valuable to
    it first) that reach the threshold. Stateful; a new task message resets it. Use one
    instance per agent and concurrent episode: ``ScriptedAgent(NegotiationFair())``.
    """

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.values: list[int] = []
        self.total, self.turns = 0, 0

    def __call__(self, observation: Any) -> str:
        text = _text(observation)
        intro = _last(r"Divide (.+?) with \w+\. Your values: (.+?) \(all: (\d+)\)", text)
        if intro is not None:
            self.counts = [int(n) for n in re.findall(r"(\d+) \w+", intro.group(1))]
            self.values = [int(n) for n in re.findall(r"\w+ (\d+)", intro.group(2))]
            self.total, self.turns = int(intro.group(3)), 0
        threshold = max(1, -(-self.total // 2) - self.turns)
        self.turns += 1
        offer = _last(r"Offer: you get .+\(worth (\d+) to you\)", text)
        if offer is not None and int(offer.group(1)) >= threshold:
            return "accept"
        keep, value = [0] * len(self.counts), 0
        for i in sorted(range(len(self.counts)), key=lambda i: -self.values[i]):
            while value < threshold and keep[i] < self.counts[i] and self.values[i] > 0:
                keep[i] += 1
                value += self.values[i]
        return "propose: " + " ".join(map(str, keep))


# --- SolverJudge -----------------------------------------------------------------------------


def solver_judge_solver(observation: Any) -> str:
    """Optimal solver: the Countdown or Arithmetic solver, whichever the task is."""
    text = _text(observation)
    return countdown_solver(text) if "Target:" in text else arithmetic_solver(text)


def solver_judge_judge(observation: Any) -> str:
    """Exact judge: re-solves the task in the prompt and checks the solver's reply."""
    text = _text(observation)
    reply = _last(r"^Solver: (.*)", text, re.MULTILINE | re.DOTALL)
    reply_text = reply.group(1) if reply else ""
    countdown_task = _last(r"Task: Numbers: ([\d ]+)\. Target: (\d+)", text)
    if countdown_task is not None:
        numbers = [int(n) for n in countdown_task.group(1).split()]
        ok = check_countdown(extract_answer(reply_text), numbers, int(countdown_task.group(2)))[0]
    else:
        question = _last(r"Task: (.+?) = \?", text)
        given = _last(r"answer\s*:\s*(-?\d+)\s*\.?\s*$", reply_text, re.IGNORECASE | re.MULTILINE)
        try:
            ok = bool(question and given) and evaluate(question.group(1)) == int(given.group(1))
        except ExprError:
            ok = False
    return "correct" if ok else "incorrect"


def solver_judge_lenient(observation: Any) -> str:
    """A judge that says ``correct`` to everything (a reward-hackable baseline)."""
    return "correct"
