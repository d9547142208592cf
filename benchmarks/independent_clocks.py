"""Lockstep vs independent training clocks with a 1:4 sample ratio, both in one process.

Two policies, ``common`` and ``rare``, each a separately parameterised tiny LLM (GRPO,
``batch_size`` episodes a step, groups of 2), on ``RareRoleEnv``
(``areal_agents.testing.rare_role``: one-step episodes). Two scenarios (``--scenario``):

- ``ratio``: both roles answer in every episode and ``rare`` has ``Policy(train_every=4)``: it
  trains once per 4 batches, on all 4 (4x the samples a step, 1/4 of the steps). Lockstep
  ``fit(4 R)`` (``rare`` trains at every 4th global step, with ``common`` waiting for it);
  independent ``fit(5 R)``: the same 4 R + R policy steps, each as soon as its batch is ready.
- ``rare``: ``rare`` answers in one episode of four (``ratio=4``), ``train_every=1``: its
  batch takes four times as many episodes as ``common``'s. Lockstep ``fit(R)``, independent
  ``fit(5 R)``. Lockstep cannot keep this up: ``common``'s staleness budget fills with
  episodes long before ``rare``'s batch does, so admission stops and the run raises
  ``Deadlocked`` (reported with the step it reached; it used to hang).

Per policy it prints: steps, steps per second of the run's wall time, and the run's wall
time split three ways: *training* (its steps minus their wait for the batch: train + weight
push), *blocked* (waiting for the other policy: in lockstep from the end of its own step to
the end of the global step, the barrier; with independent clocks from the moment its batch
was ready to the start of its step) and *own data* (the rest: waiting for its own batch);
then the episodes it trained on and those it dropped as too stale (``filtered:too_stale``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/independent_clocks.py --rounds 4``. Figures are in
``docs/multi_agent_training.md`` ("Independent clocks").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import defaultdict

from areal_agents.rollout.controller import Deadlocked
from areal_agents.testing.rare_role import RareRoleEnv
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

POLICIES = ("common", "rare")


class TimedTrainer(Trainer):
    """Records each policy step's start and end, the end of each global step and (independent
    clocks) when each policy's batch was found ready (perf_counter seconds)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.step_ends: list[tuple[float, list[str]]] = []
        self.ready_at: dict[str, float] = {}
        self.ready_delay: dict[str, float] = defaultdict(float)

    async def _wait_ready(self, names: list[str]) -> list[str]:
        ready = await super()._wait_ready(names)
        self.ready_at.update({p: time.perf_counter() for p in ready})
        return ready

    async def _train_policy(self, name: str) -> dict[str, float]:
        t0 = time.perf_counter()
        if name in self.ready_at:
            self.ready_delay[name] += t0 - self.ready_at.pop(name)
        metrics = await super()._train_policy(name)
        self.spans[name].append((t0, time.perf_counter()))
        return metrics

    async def _end_step(self, step: int, results: dict[str, dict[str, float]]) -> None:
        self.step_ends.append((time.perf_counter(), sorted(results)))
        await super()._end_step(step, results)

    def blocked(self, name: str) -> float:
        """Seconds ``name`` waited for the other policy."""
        if self.clock == "independent":
            return self.ready_delay[name]
        ends = [t for t, trained in self.step_ends if name in trained]
        # strict=False: a run stopped by Deadlocked has a finished span but no row for it
        return sum(step_end - span[1] for step_end, span in zip(ends, self.spans[name],
                                                                  strict=False))


def build(clock: str, args: argparse.Namespace) -> TimedTrainer:
    sampling = {"temperature": 1.0, "max_tokens": args.max_tokens}
    ratio, every = (1, 4) if args.scenario == "ratio" else (4, 1)
    return TimedTrainer(
        env=lambda: RareRoleEnv(ratio=ratio), clock=clock,
        policies={p: Policy(model=args.model, lr=1e-3, sampling=sampling, seed=i,
                            train_every=every if p == "rare" else 1)
                  for i, p in enumerate(POLICIES)},
        policy_map={p: p for p in POLICIES}, batch_size=args.batch_size, group_size=2,
        max_staleness=args.max_staleness, progress=False, seed=args.seed)


async def run(clock: str, steps: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    trainer = build(clock, args)
    try:
        await trainer.setup()
        t0 = time.perf_counter()
        try:
            history = await trainer.afit(steps)
        except Deadlocked as exc:
            print(f"  {clock}: stopped at global step {trainer.step}: Deadlocked: "
                  f"{str(exc)[:160]}...")
            history = trainer.history
        wall = time.perf_counter() - t0
        ledger = {p: dict(trainer.controller.ledger[p]) for p in POLICIES}
    finally:
        await trainer.aclose()
    out: dict[str, dict[str, float]] = {}
    for p in POLICIES:
        rows = [r for r in history if f"policy/{p}/version" in r]
        in_steps = sum(end - start for start, end in trainer.spans[p])
        training = in_steps - sum(r[f"policy/{p}/time/wait_rollout"] for r in rows)
        blocked = trainer.blocked(p)
        out[p] = {"steps": len(rows), "steps_per_s": len(rows) / wall, "wall_s": wall,
                  "training_s": training, "blocked_s": blocked,
                  "own_data_s": wall - training - blocked,
                  "trained": ledger[p].get("trained", 0),
                  "too_stale": ledger[p].get("filtered:too_stale", 0)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="R: lockstep steps (independent: 5R)")
    parser.add_argument("--scenario", choices=["ratio", "rare"], default="ratio")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--model", default="tiny:xs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lockstep = 4 * args.rounds if args.scenario == "ratio" else args.rounds
    budgets = {"lockstep": lockstep, "independent": 5 * args.rounds}
    print(f"scenario {args.scenario}; load average at start: {os.getloadavg()}")
    for clock, steps in budgets.items():
        result = asyncio.run(run(clock, steps, args))
        print(f"\n{clock} (fit({steps}), wall {result['common']['wall_s']:.1f} s)")
        print(f"  {'policy':8} {'steps':>5} {'steps/s':>8} {'training s':>10} "
              f"{'blocked s':>10} {'own data s':>10} {'episodes trained':>16} {'too stale':>9}")
        for p, r in result.items():
            print(f"  {p:8} {r['steps']:5d} {r['steps_per_s']:8.3f} {r['training_s']:10.1f} "
                  f"{r['blocked_s']:10.2f} {r['own_data_s']:10.1f} {r['trained']:16d} "
                  f"{r['too_stale']:9d}")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
