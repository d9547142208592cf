"""Async (max_staleness=2) vs synchronous (max_staleness=0) RL on the same workload.

(a) simulated: episodes whose generation time follows a long-tail (log-normal) token count
    times a per-token latency, on an engine with a fixed number of slots; a train step takes a
    fixed time. Isolates scheduling: the same RolloutController and staleness rule as training.
(b) tiny model: the real Trainer on Signaling-v0 (two tiny LLMs, GRPO), a few steps each.

Prints samples/s of both, the ratio, and for (a) the ideal throughput the engine allows.

    python benchmarks/async_vs_sync.py [--steps 40] [--skip-model]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from areal_agents.rollout import RolloutController, StalenessControl
from areal_agents.samples import Sample


async def simulated(max_staleness: int, *, steps: int, batch: int = 32, group: int = 8,
                    slots: int = 64, token_latency: float = 0.0005, train_time: float = 0.05,
                    seed: int = 0) -> tuple[float, float]:
    """Samples/s of a run; also returns the mean episode generation time."""
    rng = random.Random(seed)
    engine_slots = asyncio.Semaphore(slots)
    version = {"v": 0}
    gen_times: list[float] = []

    async def episode(task_seed: int, member: int) -> dict[str, list[Sample]]:
        num_tokens = min(int(rng.lognormvariate(4.0, 1.0)) + 1, 2000)  # median 55, long tail
        async with engine_slots:
            v = version["v"]
            t = num_tokens * token_latency
            gen_times.append(t)
            await asyncio.sleep(t)
        return {"p": [Sample([1, 2], [0, 1], [0.0, -1.0], [-1, v], reward=float(member % 2),
                             group=str(task_seed))]}

    controls = {"p": StalenessControl(batch, max_staleness, max_concurrent=slots)}
    ctl = RolloutController(episode, controls, group_size=group)
    runner = asyncio.create_task(ctl.run())
    start = time.perf_counter()
    for step in range(steps):
        await ctl.take("p", batch)
        await asyncio.sleep(train_time)  # the train step (the trainer runs it in a thread)
        version["v"] = step + 1
        await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
    elapsed = time.perf_counter() - start
    await ctl.stop()
    runner.cancel()
    return steps * batch / elapsed, sum(gen_times) / len(gen_times)


def tiny_model(max_staleness: int, steps: int) -> float:
    """Samples/s of the real Trainer on Signaling-v0 (no warm start; throughput only)."""
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    sampling = {"temperature": 1.0, "max_tokens": 4}
    trainer = Trainer(env="Signaling-v0",
                      policies={"speaker": Policy(lr=1e-3, sampling=sampling),
                                "listener": Policy(lr=1e-3, seed=1, sampling=sampling)},
                      policy_map={"speaker": "speaker", "listener": "listener"},
                      batch_size=32, group_size=16, max_staleness=max_staleness, progress=False)

    async def run() -> float:
        await trainer.setup()
        await trainer.afit(1)  # warm-up (first forward passes, thread pools)
        start = time.perf_counter()
        await trainer.afit(1 + steps)
        elapsed = time.perf_counter() - start
        await trainer.aclose()
        return steps * 32 / elapsed

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model-steps", type=int, default=8)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()

    sync, mean_gen = asyncio.run(simulated(0, steps=args.steps))
    asyn, _ = asyncio.run(simulated(2, steps=args.steps))
    slots, batch, train_time = 64, 32, 0.05
    ideal = min(slots / mean_gen, batch / train_time)
    print("(a) simulated long-tail engine (log-normal lengths, 64 slots, 0.5 ms/token, "
          "50 ms train step)")
    print(f"    sync  (max_staleness=0): {sync:8.1f} samples/s")
    print(f"    async (max_staleness=2): {asyn:8.1f} samples/s")
    print(f"    ratio async/sync: {asyn / sync:.2f}x   (target >= 2.5x)")
    print(f"    ideal (engine slots / mean episode time, train bound): {ideal:8.1f} samples/s; "
          f"async reaches {asyn / ideal:.0%} of it")
    if args.skip_model:
        return
    m_sync = tiny_model(0, args.model_steps)
    m_async = tiny_model(2, args.model_steps)
    print("(b) tiny model, Signaling-v0, two policies, batch 32")
    print(f"    sync  (max_staleness=0): {m_sync:8.1f} samples/s")
    print(f"    async (max_staleness=2): {m_async:8.1f} samples/s")
    print(f"    ratio async/sync: {m_async / m_sync:.2f}x")


if __name__ == "__main__":
    main()
