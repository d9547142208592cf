"""Drive an env by hand against an LLM that is only served (no trainer): episodes, printed.

Start the server in another terminal, then point this at it (any OpenAI-compatible endpoint
works: ``areal-agents serve``, vLLM, SGLang):

    areal-agents serve --model tiny:xs --policy chat --port 8000 --admin-key secret
    python examples/debugging/drive_env.py --base-url http://127.0.0.1:8000/v1 \\
        --api-key secret --model chat

``--episodes N`` plays seeds ``seed .. seed+N-1`` greedily and prints each agent's mean return:
a training-free evaluation of whatever model the endpoint serves.
"""

from __future__ import annotations

import argparse
import asyncio

import openai

import areal_agents as aa


async def drive(base_url: str, api_key: str, model: str, env_id: str, seed: int,
                episodes: int = 1) -> list[aa.Episode]:
    """Play ``episodes`` episodes of ``env_id`` (seeds ``seed``, ``seed + 1``, ...) with every
    agent answered greedily by ``model`` at ``base_url``; print the first one's transcript,
    each one's returns and, for several, the mean return per agent."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
    env = aa.make(env_id)
    agent = aa.LLMAgent(client, model, sampling={"max_tokens": 8, "temperature": 0.0})
    agents = {a: agent for a in env.possible_agents} if hasattr(env, "possible_agents") else agent
    try:
        played = [await aa.run_episode(env, agents, seed=seed + i) for i in range(episodes)]
    finally:
        await env.close()
        await client.close()
    for agent_id, transcript in played[0].messages.items():
        for message in transcript:
            print(f"{agent_id:>10} | {message['role']:>9}: {message.get('content')!r}")
    for episode in played:
        print("status:", episode.status, "returns:", episode.returns)
    if episodes > 1:
        mean = {a: round(sum(e.returns.get(a, 0.0) for e in played) / episodes, 3)
                for a in played[0].returns}
        print(f"mean returns over {episodes} episodes (seeds {seed}-{seed + episodes - 1}):", mean)
    return played


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", required=True, help="the server's admin key (not recorded)")
    parser.add_argument("--model", default="chat", help="the served policy name")
    parser.add_argument("--env", default="Signaling-v0")
    parser.add_argument("--seed", type=int, default=0, help="the first episode's seed")
    parser.add_argument("--episodes", type=int, default=1, help="episodes to play (seeds "
                        "seed, seed+1, ...); several also print the mean return per agent")
    args = parser.parse_args()
    asyncio.run(drive(args.base_url, args.api_key, args.model, args.env, args.seed,
                      args.episodes))
