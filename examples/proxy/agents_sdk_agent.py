"""An OpenAI Agents SDK agent with a function tool, trained by ``areal-agents serve --train``.

The agent (``agents.Agent``, default Responses model, so it calls the gateway's
``/v1/responses``) answers one-digit additions and may call the function tool ``add``. Each
episode is one session opened by ``areal_agents.proxy.episode``: ``Runner.run`` plays it on
the session's client, the reward is computed here (client side) and posted, the session ends
and the trainer trains on it. Each question is a task id played ``--group-size`` times (its
group for group-relative advantages). One JSON line per episode:
``{"task_id", "reward", "version", "tool_calls"}`` (``version``: the newest weight version
that generated a token of the episode). Run, next to
``areal-agents serve --train examples/proxy/train.yaml --admin-key $ADMIN``:

    pip install 'areal-agents[agents_sdk]'
    python examples/proxy/agents_sdk_agent.py --url http://127.0.0.1:8000 --key $ADMIN

It runs from any directory, the repository root included (``proxy_driver.agents_sdk``
imports the SDK past the repository's own ``agents/`` folder, which would shadow it when the
root is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

from proxy_driver import agents_sdk, base_parser, play_questions

from areal_agents.proxy import episode

_sdk = agents_sdk()
Agent, AgentsException, ModelSettings = _sdk.Agent, _sdk.AgentsException, _sdk.ModelSettings
OpenAIResponsesModel, Runner, function_tool = (_sdk.OpenAIResponsesModel, _sdk.Runner,
                                               _sdk.function_tool)
set_tracing_disabled = _sdk.set_tracing_disabled


@function_tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


def reward_of(reply: str, answer: int) -> float:
    """1 for the right number; else a small credit for each digit in the reply."""
    text = reply.strip()
    if text == str(answer):
        return 1.0
    return 0.25 * sum(ch.isdigit() for ch in text) / max(1, len(text))


async def play(args: argparse.Namespace, task: int) -> None:
    """Play question ``task`` ``args.group_size`` times at once (one group)."""
    rng = random.Random(task)
    a, b = rng.randrange(10), rng.randrange(10)

    async def one() -> None:
        async with episode(args.url, args.policy, task_id=f"q{task}", role="calculator",
                           key=args.key) as ep:
            agent = Agent(
                name="calculator", instructions="Reply with the sum only.", tools=[add],
                model=OpenAIResponsesModel(model=args.policy, openai_client=ep.client),
                model_settings=ModelSettings(temperature=1.0, max_tokens=args.max_tokens))
            try:
                result = await Runner.run(agent, f"{a} + {b} =", max_turns=args.max_turns)
                reply: str | None = str(result.final_output)
            except AgentsException:  # a reply cut at max_tokens (the SDK refuses `incomplete`
                reply = None         # answers), or MaxTurnsExceeded
            record = await ep.record()
            turns = record["turns"]
            if reply is None:  # score what the model last said
                reply = (turns[-1]["reply"] or {}).get("content") or "" if turns else ""
            reward = reward_of(reply, a + b)
            await ep.reward(reward)
            calls = sum(len((t["reply"] or {}).get("tool_calls") or []) for t in turns)
            version = max((v for t in turns for v in t["versions"]), default=-1)
        print(json.dumps({"task_id": f"q{task}", "reward": reward, "version": version,
                          "tool_calls": calls}), flush=True)

    await asyncio.gather(*(one() for _ in range(args.group_size)))


async def main(args: argparse.Namespace) -> int:
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    return await play_questions(args, play)


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--max-turns", type=int, default=3, help="model calls per episode")
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
