"""Calculator-v0: a tool-use task solved with a calculator function (OpenAI tool schema)."""

from __future__ import annotations

import json
from typing import Any

from areal_agents.env import AgentEnv
from areal_agents.envs._expr import ExprError, evaluate, format_number
from areal_agents.envs.arithmetic import parse_answer
from areal_agents.messages import Message, ToolCall, parse_action, tool_result, user

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly (+ - * / and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. '(12 + 3) * 4'"}},
            "required": ["expression"],
        },
    },
}


def run_tool_call(call: ToolCall) -> str:
    """The result text of one tool call: the exact value, or ``error: ...`` (never raises)."""
    name = call["function"]["name"]
    if name != "calculator":
        return f"error: unknown tool {name!r}; the only tool is 'calculator'"
    try:
        args = json.loads(call["function"]["arguments"] or "{}")
    except (ValueError, RecursionError) as exc:  # bad JSON, huge numbers, deep nesting
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        return f'error: arguments are not valid JSON ({reason}); send {{"expression": "..."}}'
    expression = args.get("expression") if isinstance(args, dict) else None
    if not isinstance(expression, str):
        return 'error: missing string argument \'expression\'; send {"expression": "..."}'
    try:
        return format_number(evaluate(expression))
    except ExprError as exc:
        return f"error: {exc}"


class Calculator(AgentEnv[list[Message], Message | str]):
    """Tool use: compute a large expression with a calculator tool, then answer 'Answer: N'.

    The env exposes ``tools`` (one OpenAI function schema, ``calculator(expression)``). An
    action with ``tool_calls`` gets one ``role: "tool"`` result per call (matching
    ``tool_call_id``); a call to an unknown tool, with malformed JSON arguments or a bad
    expression gets an ``error: ...`` result instead, never an exception. An action without
    tool calls is the final answer: reward 1.0 if its ``Answer: <integer>`` is exact, else 0.0,
    and the episode terminates. After ``max_turns`` actions without an answer the episode
    terminates with reward 0.0.

    Args:
        digits: digits per operand.
        terms: operands in the expression (>= 2).
        max_turns: actions allowed, the final answer included.
    """

    def __init__(self, digits: int = 4, terms: int = 3, max_turns: int = 4) -> None:
        if digits < 1 or terms < 2 or max_turns < 1:
            raise ValueError(
                f"need digits >= 1, terms >= 2, max_turns >= 1; got {digits}, {terms}, {max_turns}"
            )
        self.digits, self.terms, self.max_turns = digits, terms, max_turns
        self.tools: list[dict[str, Any]] = [CALCULATOR_TOOL]
        self.question, self.answer, self.turns = "", 0, 0

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        await super().reset(seed=seed)
        rng = self.np_random
        numbers = [
            int(rng.integers(10 ** (self.digits - 1), 10**self.digits)) for _ in range(self.terms)
        ]
        ops = [str(rng.choice(["+", "-", "*"])) for _ in range(self.terms - 1)]
        self.question = " ".join(
            [str(numbers[0])] + [f"{o} {n}" for o, n in zip(ops, numbers[1:], strict=True)]
        )
        self.answer = int(evaluate(self.question))
        self.turns = 0
        task = f"Use the calculator tool, then reply 'Answer: <number>'.\nWhat is {self.question}?"
        return [user(task)], {"question": self.question, "answer": self.answer}

    async def step(
        self, action: Message | str
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        message = parse_action(action)
        self.turns += 1
        calls = message.get("tool_calls") or []
        if not calls:
            given = parse_answer(message["content"])
            correct = given == self.answer
            feedback = "Correct." if correct else f"Wrong: the answer is {self.answer}."
            return (
                [user(feedback)],
                float(correct),
                True,
                False,
                {"answer": self.answer, "given": given},
            )
        results = [
            tool_result(c["id"], run_tool_call(c), name=c["function"]["name"]) for c in calls
        ]
        info = {"tool_calls": len(calls), "answer": self.answer}
        if self.turns >= self.max_turns:
            return [*results, user("Out of turns.")], 0.0, True, False, info
        return results, 0.0, False, False, info

    def sample_action(self, agent: str | None = None) -> str:
        """A random final answer (text actions cannot carry tool calls)."""
        return f"Answer: {self.action_rng.randint(-(10 ** (2 * self.digits)), 10 ** (2 * self.digits))}"
