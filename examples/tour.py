"""A tour of areal_agents: env, checker, adapters, tiny model, engine, gateway, agent, trainer.

    python examples/tour.py              # the whole tour: 300 GRPO steps of two tiny LLMs (CPU)
    python examples/tour.py --steps 1 --batch-size 8    # a quick look (tests/test_tour.py)

The README's "A tour" section is this file's body, verbatim (a test keeps them equal).
"""

import argparse
import asyncio

import areal_agents as aa


def free_cells(observation):  # TicTacToe's legal moves: the board is the message's last 3 lines
    board = "".join(observation[-1]["content"].splitlines()[-3:])
    return [str(cell + 1) for cell, mark in enumerate(board) if mark == "."]


async def tour(steps=300, batch_size=64):
    env = aa.make("TicTacToe-v0")                       # async, dict-keyed multi-agent env
    players = {"x": aa.ScriptedAgent(lambda obs: free_cells(obs)[0]),
               "o": aa.RandomAgent(free_cells, seed=0)}
    episode = await aa.run_episode(env, players, seed=0)
    print("TicTacToe returns:", episode.returns)
    report = await aa.check_env(env)                    # the contract (areal-agents check-env ID)
    print("check_env:", "PASS" if report.ok else report)
    gym_env = aa.to_gymnasium(aa.make("Countdown-v0"))  # sync Gymnasium / PettingZoo adapters
    observation, _ = gym_env.reset(seed=0)              # the messages as JSON text
    print("Countdown observation:", observation[:72])
    gym_env.close()

    model, tokenizer = aa.models.tiny("s", seed=0)      # offline tiny Qwen3 + ChatML tokenizer
    engine = aa.LocalEngine(model, tokenizer)           # continuous batching, log-probs, versions
    gateway = aa.Gateway()                              # OpenAI-compatible, routes by policy
    gateway.add_policy("speaker", [engine], tokenizer)
    key = await gateway.create_session("speaker")       # recorded session; its key is the API key
    client = gateway.async_client(key)                  # official openai.AsyncOpenAI, in process
    agent = aa.LLMAgent(client, "speaker", sampling={"max_tokens": 8})
    reply = await agent.act([{"role": "user", "content": "Say a word."}])
    print("untrained tiny model says:", repr(reply["content"]))
    samples, _ = gateway.end_session(key).to_samples(reward=1.0)  # exact ids, log-probs, versions
    print("recorded:", len(samples[0].token_ids), "tokens,", samples[0].num_generated, "generated")
    await gateway.close()

    trainer = aa.Trainer(env="Signaling-v0", env_kwargs={"vocab_size": 10},
                         policies={"speaker": aa.Policy(model="tiny:xs", seed=0, lr=1e-3),
                                   "listener": aa.Policy(model="tiny:xs", seed=1, lr=1e-3,
                                                         backend="archon")},   # or "megatron"
                         policy_map={"speaker": "speaker", "listener": "listener"},
                         algorithm=aa.GRPO(clip_eps=0.2, kl_coef=0.05), batch_size=batch_size,
                         group_size=8, max_staleness=1)
    try:
        history = await trainer.afit(steps)             # trainer.fit(steps) outside async code
    finally:
        await trainer.aclose()
    last = history[-1]
    print(f"step {last['step']}: success speaker {last['train/speaker/success']:.2f}, "
          f"listener {last['train/listener/success']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="GRPO steps of the trainer")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes per step (x8)")
    args = parser.parse_args()
    asyncio.run(tour(args.steps, args.batch_size))
