"""Async (max_staleness=2) vs synchronous (max_staleness=0) RL on the same workload.

(a) simulated engine (isolates scheduling): ``slots`` concurrent sequences decoding at 0.5 ms
    per token, output lengths log-normal ``int(exp(N(4, 1))) + 1`` tokens (capped at 2000; mean
    90.4, long tail: median 55, 99th percentile ~570), groups of 8 episodes, batches of 32, a 50 ms
    train step; the real ``RolloutController`` and staleness rule. The policy is a learnable
    contextual bandit (16 contexts x 8 arms, group-relative policy gradient with the
    decoupled-PPO clipped ratio, so stale samples really learn less). Two regimes:
    - GENERATION-BOUND (the headline, the regime async RL is for): 16 slots, engine bound
      16 x 2000 / 90.4 = 354 samples/s < train bound 32 / 0.05 s = 640/s, so the ideal is the
      engine bound (every slot always decoding a sample that gets trained). The slot count is
      the only parameter changed from the train-bound workload (fixed before measuring); the
      other way to the same engine bound, 32 slots at half the token rate, is reported too;
    - TRAIN-BOUND (second table): 64 slots, engine bound 1416/s > train bound 640/s = ideal.
    Runs on a simulated clock by default (exact, deterministic, load-independent); ``--wall``
    also runs it on the real clock.
(b) the real tiny model (tiny:xs, GRPO, batch 16, group 8), two workloads (``--workload``):
    ``arithmetic`` (the headline, generation-heavy): Arithmetic-v0 (2 digits, + - *, partial
    credit) after a 60-step SFT warm start on a worked-solution player (``worked_answer``:
    "47 * 83 = 47 * 80 + 47 * 3 = 3760 + 141 = 3901 / Answer: 3901", 19-28 tokens), so every
    episode generates tens of new tokens (max 48) and generation is a real share of a sync
    step; ``signaling``: Signaling-v0 (2 items): a tiny LLM speaker (format-only SFT warm
    start, 1 token per action) learns a code a scripted listener decodes. By default the speaker's inference engine runs in its
    own process (``inference: {kind: server}``: an engine server reached by ``RemoteEngine``,
    weights pushed through shared memory); ``--inference in_process`` is the old layout (a
    ``LocalEngine`` in the trainer's process), ``both`` runs the two. Threads are set per
    process: the trainer ``--trainer-threads`` (and ``OMP_NUM_THREADS=1`` unless set), the
    server ``--server-threads``. Besides the per-step split (waiting for rollouts, training,
    weight push, other) it prints CPU seconds per step of the trainer's event-loop thread
    (episodes, gateway, HTTP), its worker threads (training, weight export) and the server:
    CPU time moves far less with load than wall time does.

Every trained group is checked: no sample is trained more than ``max_staleness`` versions old.

Figures (2026-11-25; (b) and ``--wall`` taken on 2 CPU cores shared with 5 other jobs, load
average ~10: noisy). (a) simulated clock, 200 steps = 6400 trained samples per setting, mean
of 3 seeds:

(a) GENERATION-BOUND, 16 slots; ideal = engine bound = 354 samples/s:
    sync  (max_staleness=0): 105.3 samples/s (30% of ideal; slots idle 71% waiting for the
                             tail: a step is >= max(E[longest of 32] 496 tok, 32 x 90.4 / 16)
                             x 0.5 ms + 50 ms = 298 ms, so sync <= 107/s)
    async (max_staleness=2): 312.4 samples/s (88% of ideal); ratio 2.97x.
    Targets (>= 2.5x; within 15% of ideal): both met in samples/s. In tokens async trains 77%
    of the engine's token capacity: slots are 1% idle but 22% of slot time goes to episodes
    that are not trained (1208 of 7484 episodes dropped too stale: groups whose straggler
    outlives the ~2-step, ~361-token window), and the trained samples are shorter than the
    generated ones (79.4 vs 89.9 tokens mean), which is why samples/s (88%) exceeds tokens (77%).
    Reward at equal samples (bandit success, sampled): 1600 samples sync 0.220 / async 0.229
    (+0.008); 3200: 0.444 / 0.455 (+0.012); 6400: 0.850 / 0.854 (+0.003).
    max_staleness=4: 348.9 samples/s (99%). max_staleness=2 with partial_groups=4: 362.9
    (102% of the samples/s ideal only through length bias: 82% of token capacity, trained
    length 71.9). Sensitivity: the same engine bound from 32 slots x 1000 tok/s (the tail lasts
    twice as many train steps): sync 60.4, async 233.5 samples/s, 3.87x, async at 66% of ideal.

(a') TRAIN-BOUND, 64 slots; ideal = train bound = 640 samples/s:
    sync  (max_staleness=0): 110.4 samples/s (17% of ideal)
    async (max_staleness=2): 419.9 samples/s (66% of ideal); ratio 3.80x.
    85% of ideal is not reachable at max_staleness=2 here: under the AReaL rule at most
    (2+1) x 32 = 96 episodes are admitted and not yet in an applied update; each holds its slot
    from admission to its batch's weight update >= E[slowest of its group of 8] = 278.9 tokens
    x 0.5 ms + 50 ms train = 189.5 ms, so by Little's law X <= 96 / 0.1895 s = 507 samples/s
    (79% of ideal) even with no loss; and 1843 of 8036 generated episodes belong to groups
    whose straggler outlives 2 versions, which the staleness rule must drop.
    max_staleness=4: 628.8 samples/s (98%). max_staleness=2 with partial_groups=4 (a group's
    stragglers are cut at its last trainable step): 509.9 samples/s (80%).
    Length bias (mean tokens generated vs trained): sync 89.0 / 89.0, async 89.9 / 75.7,
    partial groups 89.9 / 69.7: dropping too-stale groups favours short outputs.
    Reward at equal samples: 1600 samples sync 0.223 / async 0.219 (-0.004); 3200: 0.446 /
    0.440 (-0.005); 6400: 0.853 / 0.850 (-0.003).
(a), (a') on the real clock (--wall, seed 0, under load): 16 slots sync 101.8, async 291.9
    samples/s, 2.87x; 64 slots sync 111.9, async 405.0, 3.62x.
(b) tiny model, 24 steps = 384 samples per setting, 2 runs each (median), in process (before
    2026-12-03): sync 96.2 samples/s (75.4, 117.1), async 106.1 (99.3, 112.9): 1.10x; earlier
    runs of the same command: 0.87x, 1.03x. Train-bound: sync ~50 ms waiting for rollouts +
    114 ms training; async 3 ms + 138 ms.
(b) 2026-12-03, engine server out of process (the default), machine shared by ~8 engineers,
    load 9-14 on 2 cores throughout (never lower that day), so wall times are 5-10x the quiet
    figures and ratios are noisy:
    - load 13-14, 2 runs each, with KeepAliveTransport: sync 7.4 samples/s (2175 ms/step =
      wait 769 + train 1185 + push 73 + other 148), async 9.8 (1648 = 52 + 1440 + 50 + 106):
      1.32x. CPU per step sync / async: trainer event loop 168 / 141 ms, trainer workers
      (training) 354 / 329 ms, engine server 135 / 136 ms (the server is idle > 90% of a step).
      Re-run at load 10-12: sync 8.6 (1862 = 564 + 1123 + 53 + 122), async 9.2 (1735 = 63 +
      1499 + 52 + 121): 1.08x; CPU per step 139 / 141, 328 / 313, 124 / 133 ms.
    - before KeepAliveTransport (httpx2's default pool): load 5-7, 1 run: 2.04x (sync 1736
      ms/step = wait 634 + train 924 + push 74 + other 103; async 850 = 41 + 714 + 45 + 50);
      load 9-10, 2 runs: 0.91x; load 9, 6 steps: 1.35x with the event loop at 203 / 252 ms
      CPU per step (168 / 141 ms with the transport).
    - in process, same sessions: load 5-7 1.00x, load 9-10 0.74x.
    Why the ratio is short of 1.5x: the step is train-bound and the trainer's process still
    does all the per-episode Python work (env, scripted agent, OpenAI client, in-process
    gateway, HTTP client) on its event-loop thread, under the same GIL as the training thread;
    only the forward passes moved to the server. Per step ~150 ms of that loop CPU and ~330 ms
    of training CPU share one GIL, so overlap can hide at most the loop's share: by these CPU
    figures, on 2 free cores the best async step is ~330-480 ms against a sync step of ~650
    ms (1.35-2x, depending on how much of training runs with the GIL released). Under load
    the training thread gets ~25% of a core whichever mode runs. Reward at equal samples
    as before: train success last 5 steps sync 0.99, async 0.82; greedy eval 1.00 / 1.00.
(b) 2026-12-03 late, training in a worker process too (--train-workers: train: {workers:
    true}, so the trainer's process keeps only the event loop), --quick (1 run each), load
    13 -> 10: sync 14.3 samples/s (1116 ms/step = wait 195 + train 576 + push 203 + other
    141), async 17.8 (901 = 28 + 555 + 164 + 154): 1.24x, target >= 1.5x NOT met. Async hid
    almost all the waiting (195 -> 28 ms); what is left is train-bound: with the wait removed
    entirely the ceiling of this workload is 1116 / (1116 - 195) = 1.21x-1.3x, so 1.5x needs
    generation to be a larger share of the step (or faster training), not less GIL sharing.
    CPU per step sync / async: event loop 52 / 63 ms, trainer threads 27 / 25 ms (training
    now in the worker), engine server 103 / 100 ms. Train success last 5 steps 0.99 / 0.93,
    greedy eval 1.00 / 1.00.

(b) 2026-12-04, both workloads, --train-workers --quick (1 run each), weight export packed
    into few pipe messages (``trainers/tensor_pack.py``) and small updates received in memory
    by the server (``service.receive_update``); load 6-10 throughout (5 engineers on 2 cores):
    - arithmetic, load 8.0 -> 5.9: sync 18.9 samples/s (847 ms/step = wait for rollouts 423 +
      train 301 + push 40 + other 83; 21.0 new tokens per sample), async 18.2 (877 = 69 + 601
      + 76 + 131; 22.0 tokens): 0.97x (1.01x in trained tokens/s), target NOT met here. The
      wait is 50% of a sync step (hiding it allows 2.0x), but the CPU per step (sync: server
      284 + training worker 166 + event loop 48 + threads 10 = 508 ms; async 546 ms) was
      spread over only ~0.6 busy cores on both sides: the other jobs held the cores, so the
      overlap had no idle core to fill and async's training slowed (301 -> 601 ms) by as much
      as its wait shrank. On 2 free cores the same CPU would allow up to 3.3x, so the ceiling
      there is the smaller bound, 2.0x (the hidden wait). An earlier run at lr 1e-3 (load 9-10) gave 2.86x,
      but its sync policy drifted to 43-token outputs (async: 19), which inflates the ratio;
      lr is 3e-4 since, and tokens/s is printed next to samples/s.
    - signaling, load 9.9 -> 8.3: sync 20.7 (773 = 200 + 402 + 65 + 106), async 24.2 (662 = 22 + 461
      + 74 + 105): 1.17x; the lead's quiet run (load 0.5-0.9, before the packed export) gave
      1.13x (sync 226 ms = 45 + 117 + 33 + 31): generation is too small a share for 1.5x.
    Re-run on a quiet machine (the measurement that decides the target):
    python benchmarks/async_vs_sync.py --only-model --train-workers --quick --workload both

(b) 2026-12-04 12:27-12:55 UTC, the quiet re-run (the lead; other engineers' jobs ran under
    nice 19, load average 0.0 -> 1.5 including this run), arithmetic, --train-workers:
    - --quick (lr 3e-4, 24 steps, 1 run each), three times: 1.60x / 1.31x / 1.52x in samples/s
      (1.90x / 1.53x / 1.86x in trained new tokens/s); e.g. the first: sync 59.4 samples/s
      (270 ms/step = wait 146 + train 80 + push 19 + other 24), async 95.2 (168 = 25 + 92 +
      21 + 30); cores busy 1.09 vs 1.62 of 2.
    - --model-steps 48 --repeats 3 (lr 3e-4): 1.83x in samples/s but 1.18x in tokens/s: the
      sync policy drifted to 48-token (max-length) outputs (31.4 tokens/sample vs 20.2), so
      neither figure compares equal work.
    - --model-steps 48 --repeats 3 --lr 1e-12 (the policy, and so the output length, held
      fixed: 24.0 vs 23.8 new tokens per sample): sync 55.7 samples/s (runs 48.4 / 55.7 /
      61.6; 287 ms/step = wait 158 + train 84 + push 20 + other 25), async 85.2 (72.5 / 85.2 /
      98.0; 188 = 30 + 113 + 24 + 24; 32 episodes dropped too stale, counted): **1.53x in
      samples/s, 1.51x in tokens/s: the >= 1.5x target is met at equal work**, with the
      spread of single runs about +-15%. The bound printed is 1.82x (the sync CPU per step
      spread over 2 cores).
    python benchmarks/async_vs_sync.py --only-model --train-workers --workload arithmetic \
        --model-steps 48 --repeats 3 --lr 1e-12

    python benchmarks/async_vs_sync.py              # (a), (a') and (b), about 3 minutes quiet
    python benchmarks/async_vs_sync.py --quick      # fewer steps, 1 run each, under a minute
    python benchmarks/async_vs_sync.py --skip-model --wall
    python benchmarks/async_vs_sync.py --only-model --inference both   # (b) out of / in process
    python benchmarks/async_vs_sync.py --only-model --quick --train-workers  # (b), train in a worker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# one torch/OMP thread for this (the trainer's) process unless the caller chose; set before
# torch is imported, since OpenMP reads it once. Engine servers get --server-threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from areal_agents.rollout import RolloutController, StalenessControl
from areal_agents.samples import Sample
from areal_agents.testing.sim import SimBandit, SimEngine, run_virtual


@dataclass
class SimConfig:
    """Workload (a): engine, lengths, batch/group and train time."""

    slots: int = 64
    token_latency: float = 0.0005
    mu: float = 4.0
    sigma: float = 1.0
    max_tokens: int = 2000
    batch: int = 32
    group: int = 8
    train_time: float = 0.05

    def engine(self, seed: int = 0) -> SimEngine:
        return SimEngine(self.slots, self.token_latency, self.mu, self.sigma, self.max_tokens,
                         seed=seed)


# Generation-bound (the headline): 16 slots -> engine bound 354/s < train bound 640/s.
GENERATION_BOUND = SimConfig(slots=16)
# Train-bound: 64 slots -> engine bound 1416/s > train bound 640/s.
TRAIN_BOUND = SimConfig(slots=64)


async def simulated(cfg: SimConfig, max_staleness: int, steps: int, seed: int = 0,
                    checkpoints: tuple[int, ...] = (), partial_groups: int = 0) -> dict[str, Any]:
    """Train ``steps`` batches; samples/s, utilisation, drops, lengths and bandit success."""
    loop = asyncio.get_running_loop()
    engine, policy = cfg.engine(seed), SimBandit(seed=seed)

    async def episode(task_seed: int, member: int) -> dict[str, list[Sample]]:
        num_tokens, first, last = await engine.generate()
        arm, reward = policy.act(task_seed, first)
        meta = {"context": task_seed % policy.contexts, "arm": arm, "version": first,
                "tokens": num_tokens}
        return {"p": [Sample([1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, first, last],
                             reward=reward, group=str(task_seed), meta=meta)]}

    control = StalenessControl(cfg.batch, max_staleness, max_concurrent=cfg.slots)
    ctl = RolloutController(episode, {"p": control}, group_size=cfg.group,
                            partial_groups=partial_groups)
    runner = asyncio.create_task(ctl.run())
    start, success, rewards, lengths = loop.time(), {}, [], []
    for step in range(steps):
        groups = await ctl.take("p", cfg.batch)
        samples = [s for g in groups for s in g.samples]
        lengths += [s.meta["tokens"] for s in samples]
        for s in samples:  # the staleness rule, checked on every trained token
            lag = step - min(v for v in s.versions if v >= 0)
            assert lag <= max_staleness, f"sample {lag} versions old > {max_staleness}"
        await asyncio.sleep(cfg.train_time)  # the train step
        policy.train(samples)
        rewards.append(statistics.fmean(s.reward for s in samples))
        engine.update_weights(step + 1)
        await ctl.update_weights("p", lambda: asyncio.sleep(0), step + 1)
        if step + 1 in checkpoints:
            success[(step + 1) * cfg.batch] = policy.success()
    elapsed = loop.time() - start
    await ctl.stop()
    runner.cancel()
    slot_time = cfg.slots * elapsed
    useful = sum(lengths) * cfg.token_latency / slot_time
    used = (engine.busy + engine.cancelled_busy) / slot_time
    return {"rate": len(lengths) / elapsed, "useful": useful, "wasted": max(0.0, used - useful),
            "idle": 1 - used,
            "train_util": steps * cfg.train_time / elapsed, "generated": engine.generated,
            "too_stale": ctl.ledger["p"]["filtered:too_stale"], "success": success,
            "reward_last5": statistics.fmean(rewards[-5:]),
            "trained_tokens": statistics.fmean(lengths),
            "requested_tokens": engine.requested_tokens / engine.requested,
            "stragglers": ctl.ledger["p"]["filtered:straggler"]}


def expected_max_tokens(cfg: SimConfig, n: int, draws: int = 100_000) -> float:
    """E[the longest of ``n`` output lengths] (Monte Carlo, fixed seed)."""
    rng, eng = random.Random(7), cfg.engine()
    return statistics.fmean(max(eng._length(rng) for _ in range(n)) for _ in range(draws // n))


def _mean_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: statistics.fmean(r[k] for r in runs) for k in runs[0] if k != "success"}
    out["success"] = {n: statistics.fmean(r["success"][n] for r in runs)
                      for n in runs[0]["success"]}
    return out


def _runs(cfg: SimConfig, staleness: int, steps: int, seeds: int, **kw: Any) -> dict[str, Any]:
    return _mean_runs([run_virtual(simulated(cfg, staleness, steps, seed=k, **kw))
                       for k in range(seeds)])


def _bounds(cfg: SimConfig) -> tuple[float, float, float]:
    """(mean output tokens, engine bound, train bound) in samples/s."""
    mean_tokens = cfg.engine().mean_tokens()
    return mean_tokens, cfg.slots / cfg.token_latency / mean_tokens, cfg.batch / cfg.train_time


def _table(title: str, cfg: SimConfig, steps: int, seeds: int) -> tuple[dict, dict, float]:
    """Print the workload, the ideal's derivation, sync vs async; return (sync, async, ideal)."""
    mean_tokens, engine_bound, train_bound = _bounds(cfg)
    ideal = min(engine_bound, train_bound)
    checkpoints = (steps // 4, steps // 2, steps)
    sync, asyn = (_runs(cfg, s, steps, seeds, checkpoints=checkpoints) for s in (0, 2))
    rate = 1 / cfg.token_latency
    print(f"{title}: {cfg.slots} slots x {rate:.0f} tok/s each, lengths int(exp(N({cfg.mu}, "
          f"{cfg.sigma}))) + 1 <= {cfg.max_tokens} tokens, group {cfg.group}, batch {cfg.batch}, "
          f"train step {cfg.train_time * 1e3:.0f} ms; simulated clock, {steps} steps, mean of "
          f"{seeds} seed(s)")
    bound = "engine" if engine_bound < train_bound else "train"
    print(f"    ideal: mean output length {mean_tokens:.1f} tokens -> engine bound = slots x tok/s "
          f"/ mean = {cfg.slots} x {rate:.0f} / {mean_tokens:.1f} = {engine_bound:.0f}/s; train "
          f"bound = batch / train time = {cfg.batch} / {cfg.train_time} = {train_bound:.0f}/s; "
          f"ideal = min = {ideal:.0f} samples/s ({bound} bound)")
    for name, s, r in (("sync ", 0, sync), ("async", 2, asyn)):
        print(f"    {name} (max_staleness={s}): {r['rate']:6.1f} samples/s = "
              f"{r['rate'] / ideal:4.0%} of ideal | engine slot time: trained {r['useful']:.0%}, "
              f"generated but not trained (dropped, cancelled or left in the buffer) "
              f"{r['wasted']:.0%}, idle {r['idle']:.0%}; trainer busy {r['train_util']:.0%}; "
              f"{r['too_stale']:.0f} of {r['generated']:.0f} episodes "
              f"dropped too stale")
    ratio, share = asyn["rate"] / sync["rate"], asyn["rate"] / ideal
    verdict = {True: "met", False: "NOT met"}
    print(f"    ratio async/sync: {ratio:.2f}x (target >= 2.5x: {verdict[ratio >= 2.5]}); async "
          f"at {share:.0%} of ideal (target >= 85%: {verdict[share >= 0.85]})")
    print(f"    in tokens (trained samples are shorter when long groups are dropped): async "
          f"trains {asyn['useful']:.0%} of the engine's token capacity, sync {sync['useful']:.0%}")
    return sync, asyn, ideal


def _reward_and_lengths(sync: dict, asyn: dict, extra: tuple[tuple[str, dict], ...] = ()) -> None:
    print("    mean output length, generated vs trained (a length bias shows as a gap): "
          + "; ".join(f"{name} {r['requested_tokens']:.1f} vs {r['trained_tokens']:.1f}"
                      for name, r in (("sync", sync), ("async", asyn), *extra)))
    for samples in sorted(sync["success"]):
        a, b = sync["success"][samples], asyn["success"][samples]
        print(f"    reward at equal samples ({samples} trained): bandit success sync {a:.3f}, "
              f"async {b:.3f}, difference {b - a:+.3f}")


def report_generation_bound(cfg: SimConfig, steps: int, seeds: int) -> None:
    """The headline: engine slots are the bottleneck, sync idles them waiting for the tail."""
    title = "(a) GENERATION-BOUND simulated engine (headline)"
    sync, asyn, ideal = _table(title, cfg, steps, seeds)
    longest = expected_max_tokens(cfg, cfg.batch)
    mean_tokens = cfg.engine().mean_tokens()
    wave = max(longest, cfg.batch * mean_tokens / cfg.slots) * cfg.token_latency
    print(f"    sync ceiling: a step generates {cfg.batch} episodes on {cfg.slots} slots, then "
          f"trains; on average it lasts >= max(E[longest of {cfg.batch}] {longest:.0f} tok, "
          f"{cfg.batch} x {mean_tokens:.1f} / {cfg.slots} tok) x {cfg.token_latency * 1e3:g} ms + "
          f"{cfg.train_time * 1e3:.0f} ms = {(wave + cfg.train_time) * 1e3:.0f} ms -> <= "
          f"{cfg.batch / (wave + cfg.train_time):.0f} samples/s in the long run (a short run may "
          f"beat it by luck in the tail)")
    window = 2 * cfg.batch / ideal / cfg.token_latency
    print(f"    async losses: a group is trainable only if its straggler finishes within ~2 "
          f"steps of {cfg.batch / ideal * 1e3:.0f} ms at the ideal rate = {window:.0f} tokens; "
          f"longer stragglers get their whole group dropped too stale")
    _reward_and_lengths(sync, asyn)
    more = _runs(cfg, 4, steps, seeds)
    print(f"    (max_staleness=4 on the same workload: {more['rate']:.1f} samples/s = "
          f"{more['rate'] / ideal:.0%} of ideal)")
    part = _runs(cfg, 2, steps, seeds, partial_groups=cfg.group // 2)
    print(f"    (max_staleness=2, partial_groups={cfg.group // 2}: {part['rate']:.1f} samples/s = "
          f"{part['rate'] / ideal:.0%} of ideal, but only {part['useful']:.0%} of the token "
          f"capacity trained: cutting stragglers biases trained length to "
          f"{part['trained_tokens']:.1f} tokens)")
    slow = SimConfig(slots=cfg.slots * 2, token_latency=cfg.token_latency * 2)
    rates = {s: _runs(slow, s, steps, seeds)["rate"] for s in (0, 2)}
    print(f"    (sensitivity, same engine bound with {slow.slots} slots x "
          f"{1 / slow.token_latency:.0f} tok/s, i.e. the tail lasts twice as many train steps: "
          f"sync {rates[0]:.1f}, async {rates[2]:.1f} samples/s, {rates[2] / rates[0]:.2f}x, "
          f"async at {rates[2] / ideal:.0%} of ideal)")


def report_train_bound(cfg: SimConfig, steps: int, seeds: int) -> None:
    """The second table: the train step is the bottleneck; the AReaL rule caps throughput."""
    sync, asyn, ideal = _table("(a') TRAIN-BOUND simulated engine", cfg, steps, seeds)
    longest = expected_max_tokens(cfg, cfg.group)
    hold = longest * cfg.token_latency + cfg.train_time
    slots = 3 * cfg.batch
    print(f"    AReaL-rule ceiling at max_staleness=2: at most (2+1) x {cfg.batch} = {slots} "
          f"episodes admitted and not yet in an applied update; each is held from admission to "
          f"its batch's weight update >= E[longest of {cfg.group}] {longest:.1f} tok x "
          f"{cfg.token_latency * 1e3:g} ms + {cfg.train_time * 1e3:.0f} ms = {hold * 1e3:.1f} ms "
          f"-> by Little's law <= {slots / hold:.0f} samples/s "
          f"({min(slots / hold, ideal) / ideal:.0%} of ideal), before too-stale drops")
    more = _runs(cfg, 4, steps, seeds)
    print(f"    (max_staleness=4 on the same workload: {more['rate']:.1f} samples/s = "
          f"{more['rate'] / ideal:.0%} of ideal)")
    part = _runs(cfg, 2, steps, seeds, partial_groups=cfg.group // 2)
    print(f"    (max_staleness=2, partial_groups={cfg.group // 2}: a group's members still "
          f"generating at its last trainable step are cancelled: {part['rate']:.1f} samples/s = "
          f"{part['rate'] / ideal:.0%} of ideal, {part['stragglers']:.0f} stragglers cut)")
    _reward_and_lengths(sync, asyn, (("partial", part),))


def report_wall(cfg: SimConfig, steps: int) -> None:
    walls = {s: asyncio.run(simulated(cfg, s, steps)) for s in (0, 2)}
    print(f"    real clock, {cfg.slots} slots (under load): sync {walls[0]['rate']:.1f}, async "
          f"{walls[2]['rate']:.1f} samples/s, {walls[2]['rate'] / walls[0]['rate']:.2f}x")


def _cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds of process ``pid`` (or of its thread ``tid``); Linux
    ``/proc`` only, None elsewhere or when it has exited."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process, by thread id (empty off Linux)."""
    pid = os.getpid()
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    return {t: c for t in tids if (c := _cpu_seconds(pid, t)) is not None}


def _cpu_split(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """(main thread, other threads) CPU seconds between two ``_thread_cpu()`` readings; the
    main thread runs the event loop (episodes, gateway, HTTP to engine servers), the others
    the trainer's ``to_thread`` work (forward/backward, weight export, shared-memory send)."""
    main = os.getpid()
    delta = {t: c - before.get(t, 0.0) for t, c in after.items()}
    return delta.get(main, 0.0), sum(c for t, c in delta.items() if t != main)


def _server_pids(trainer: Any) -> list[int]:
    """Process ids of the engine servers behind the trainer's gateway (none in process)."""
    engines = [e for p in trainer.gateway.policies.values() for e in p.router.engines]
    return [e.server.proc.pid for e in engines if getattr(e, "server", None) is not None]


def _signaling_decode(observation: Any) -> str:
    """The scripted listener: reads "message: d", picks the d-th letter."""
    text = observation[-1]["content"] if isinstance(observation, list) else str(observation)
    message = text.rsplit("message:", 1)[-1].strip()
    return chr(ord("A") + int(message)) if message.isdigit() else "A"


def worked_answer(observation: Any) -> str:
    """The Arithmetic warm-start player: a worked solution of tens of tokens, e.g.
    ``"47 * 83 = 47 * 80 + 47 * 3 = 3760 + 141 = 3901\nAnswer: 3901"`` (tens, then units)."""
    text = observation[-1]["content"] if isinstance(observation, list) else str(observation)
    a, op, b = text.strip().splitlines()[-1].split()[:3]
    x, y = int(a), int(b)
    tens, units = y // 10 * 10, y % 10
    value = {"+": x + y, "-": x - y, "*": x * y}[op]
    if op == "*":
        steps = f"{x} * {tens} + {x} * {units} = {x * tens} + {x * units}"
    else:
        steps = f"{x} {op} {tens} {op} {units} = {x - tens if op == '-' else x + tens} {op} {units}"
    return f"{x} {op} {y} = {steps} = {value}\nAnswer: {value}"


@dataclass(frozen=True)
class Workload:
    """One real-model workload of part (b): the env, the trained policy (tiny:xs, GRPO) and
    its agent, the fixed agents, sampling, and the SFT warm-start players."""

    name: str
    env: str
    env_kwargs: dict[str, Any]
    agent: str
    max_tokens: int
    lr: float
    what: str

    def trainer_kwargs(self) -> dict[str, Any]:
        """``policy_map``, ``agents`` and ``warm_start`` of the Trainer."""
        from areal_agents.agents import ScriptedAgent

        if self.name == "signaling":
            listener = ScriptedAgent(_signaling_decode)
            return {"policy_map": {self.agent: "p"}, "agents": {"listener": listener},
                    "warm_start": {"episodes": 32, "players": {self.agent: "random",
                                                              "listener": listener}}}
        return {"policy_map": {self.agent: "p"},
                "warm_start": {"episodes": 32, "players": {self.agent: ScriptedAgent(
                    worked_answer)}}}


SIGNALING = Workload(
    "signaling", "Signaling-v0", {"num_items": 2, "pool_size": 2}, "speaker", 1, 3e-3,
    "Signaling-v0 speaker + scripted listener, ONE new token per episode (generation is a "
    "small part of a step)")
ARITHMETIC = Workload(
    "arithmetic", "Arithmetic-v0", {"digits": 2, "operations": "+-*", "partial_credit": True},
    "agent", 48, 3e-4,
    "Arithmetic-v0 (2 digits, partial credit), worked answers of tens of new tokens per "
    "episode (<= 48; SFT warm start on a worked-solution player): generation is a real share "
    "of the step, the regime async RL is for")
WORKLOADS = {w.name: w for w in (SIGNALING, ARITHMETIC)}


def _worker_pids(trainer: Any) -> list[int]:
    """Process ids of the training workers (none when training in this process)."""
    groups = [getattr(e, "_group", None) for e in trainer.train_engines.values()]
    return [p.pid for g in groups for p in getattr(g, "_procs", [])]


def tiny_model(max_staleness: int, steps: int, inference: str = "server",
               server_threads: int = 1, trainer_threads: int = 1,
               train_workers: bool = False, workload: Workload = SIGNALING) -> dict[str, float]:
    """The real Trainer on ``workload``: samples/s after setup, where a step's time goes,
    train success late, greedy eval success, generated tokens per trained sample.
    ``inference="server"`` serves the policy from an engine server in its own process
    (``server_threads`` torch threads) and the trainer keeps ``trainer_threads``;
    ``"in_process"`` serves it from a ``LocalEngine`` in this process. ``train_workers``
    trains in a worker process (``train: {workers: true}``, a group of one rank with
    ``trainer_threads`` threads) instead of the trainer's own process."""
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    placement: dict[str, Any] = {"kind": inference}
    if inference == "server":
        placement["server_args"] = {"threads": server_threads}
    batch = 16
    stop = {"stop": ["<|im_end|>"]} if workload.max_tokens > 1 else {}
    trainer = Trainer(
        env=workload.env, env_kwargs=workload.env_kwargs,
        policies={"p": Policy(lr=workload.lr, seed=0, sampling={
            "temperature": 1.0, "max_tokens": workload.max_tokens, **stop}, sft_steps=60,
            sft_lr=3e-3, api="completions", inference=placement,
            train={"workers": train_workers, "threads": trainer_threads})},
        batch_size=batch, group_size=8, max_staleness=max_staleness, progress=False,
        eval_seeds=range(500, 532), torch_threads=trainer_threads, **workload.trainer_kwargs())

    async def run() -> dict[str, float]:
        await trainer.setup()
        pids, workers = _server_pids(trainer), _worker_pids(trainer)
        server_cpu0 = [_cpu_seconds(pid) for pid in pids]
        worker_cpu0 = [_cpu_seconds(pid) for pid in workers]
        start, threads0 = time.perf_counter(), _thread_cpu()
        history = await trainer.afit(steps)
        elapsed, (loop_cpu, work_cpu) = time.perf_counter() - start, _cpu_split(threads0,
                                                                                 _thread_cpu())
        server_cpu = [_cpu_seconds(pid) for pid in pids]
        worker_cpu = [_cpu_seconds(pid) for pid in workers]
        trained = [b - a for a, b in zip(worker_cpu0, worker_cpu, strict=True)
                   if a is not None and b is not None]
        evaluation = await trainer.evaluate()
        await trainer.aclose()
        lags = [int(k.rsplit("/", 1)[1]) for h in history for k, v in h.items()
                if k.startswith("policy/p/staleness/") and v > 0]
        assert max(lags) <= max_staleness, f"trained a sample {max(lags)} versions old"
        agent = workload.agent
        late = statistics.fmean(h[f"train/{agent}/success"] for h in history[-5:])
        split = {k: 1e3 * statistics.fmean(h[f"policy/p/time/{k}"] for h in history)
                 for k in ("wait_rollout", "train", "weight_sync")}
        step_ms = 1e3 * elapsed / steps
        busy = [b - a for a, b in zip(server_cpu0, server_cpu, strict=True)
                if a is not None and b is not None]
        return {"rate": steps * batch / elapsed, "step": step_ms, "late": late,
                "eval": evaluation[f"eval/{agent}/success"], **split,
                "other": step_ms - sum(split.values()), "loop_cpu": 1e3 * loop_cpu / steps,
                "work_cpu": 1e3 * work_cpu / steps,
                "server_cpu": 1e3 * sum(busy) / steps if busy else float("nan"),
                "worker_cpu": 1e3 * sum(trained) / steps if trained else float("nan"),
                "gen_len": statistics.fmean(h["policy/p/trained_gen_len"] for h in history),
                "gen_len_first": statistics.fmean(h["policy/p/trained_gen_len"]
                                                  for h in history[:5]),
                "gen_len_last": statistics.fmean(h["policy/p/trained_gen_len"]
                                                 for h in history[-5:]),
                "too_stale": history[-1].get("outcomes/p/outcome/filtered:too_stale", 0.0)}

    return asyncio.run(run())


def report_model(steps: int, repeats: int, inference: str, staleness: int,
                 server_threads: int, trainer_threads: int, train_workers: bool = False,
                 workload: Workload = SIGNALING) -> float:
    """Sync vs async on the real tiny model, interleaved; prints the split; returns the ratio."""
    runs: dict[int, list[dict[str, float]]] = {0: [], staleness: []}
    for _ in range(repeats):  # interleaved, so both settings see similar load
        for s in runs:
            runs[s].append(tiny_model(s, steps, inference, server_threads, trainer_threads,
                                      train_workers, workload))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    where = (f"served by an engine server in its own process ({server_threads} torch "
             f"thread(s)), trainer {trainer_threads} thread(s)" if inference == "server" else
             f"served in process (LocalEngine), {trainer_threads} torch thread(s)")
    where += "; training in a worker process" if train_workers else ""
    print(f"(b) tiny model (tiny:xs) [{workload.name}]: {workload.what}; batch 16, {steps} "
          f"steps = {steps * 16} samples each, median of {repeats} run(s); {where}")
    for name, s in (("sync ", 0), ("async", staleness)):
        m = med[s]
        rates = ", ".join(f"{r['rate']:.1f}" for r in runs[s])
        server = ("" if inference != "server" else
                  f", engine server {m['server_cpu']:.0f} ms (busy "
                  f"{m['server_cpu'] / m['step']:.0%} of the step, idle the rest)")
        print(f"    {name} (max_staleness={s}): {m['rate']:6.1f} samples/s ({rates}), "
              f"{m['step']:.0f} ms/step = wait for rollouts {m['wait_rollout']:.0f} + train "
              f"{m['train']:.0f} + weight push {m['weight_sync']:.0f} + other {m['other']:.0f} "
              f"ms; {m['too_stale']:.0f} episodes dropped too stale")
        print(f"        new tokens per trained sample {m['gen_len']:.1f} (first 5 steps "
              f"{m['gen_len_first']:.1f}, last 5 {m['gen_len_last']:.1f}); "
              f"{m['rate'] * m['gen_len']:.0f} trained new tokens/s")
        worker = (f", training worker process {m['worker_cpu']:.0f} ms" if train_workers
                  else "")
        print(f"        CPU per step: trainer event loop (episodes, gateway, HTTP) "
              f"{m['loop_cpu']:.0f} ms, trainer worker threads (train, weight export/push) "
              f"{m['work_cpu']:.0f} ms{worker}{server}")
        total = sum(m[k] for k in ("loop_cpu", "work_cpu", "worker_cpu", "server_cpu")
                    if m[k] == m[k])  # NaN: not measured (in process)
        print(f"        cores busy on average: {total / m['step']:.2f} of {os.cpu_count()} "
              f"({total:.0f} ms CPU per {m['step']:.0f} ms step); overlap can only fill idle "
              f"cores, so under load (other jobs holding the cores) neither side gets more")
    sync = med[0]
    hidden = sync["step"] / max(sync["step"] - sync["wait_rollout"], 1e-9)
    cpu = sum(sync[k] for k in ("loop_cpu", "work_cpu", "worker_cpu", "server_cpu")
              if sync[k] == sync[k])
    cores = os.cpu_count() or 1
    print(f"    why: in sync, waiting for rollouts is {sync['wait_rollout'] / sync['step']:.0%} "
          f"of a step; if async hid all of it (and nothing else slowed) the ratio would be "
          f"{hidden:.2f}x; with the sync CPU per step ({cpu:.0f} ms) spread over {cores} free "
          f"cores it would be {sync['step'] * cores / max(cpu, 1e-9):.2f}x (the smaller bounds "
          f"it)")
    ratio = med[staleness]["rate"] / med[0]["rate"]
    tokens = ratio * med[staleness]["gen_len"] / max(med[0]["gen_len"], 1e-9)
    print(f"    ratio async/sync: {ratio:.2f}x in samples/s (target >= 1.5x: "
          f"{'met' if ratio >= 1.5 else 'NOT met'}); {tokens:.2f}x in trained new tokens/s "
          f"(compare both: a run whose policy drifts to longer outputs is slower per sample)")
    print(f"    reward at equal samples ({steps * 16}): train success (last 5 steps) sync "
          f"{med[0]['late']:.2f}, async {med[staleness]['late']:.2f}, difference "
          f"{med[staleness]['late'] - med[0]['late']:+.2f}; greedy eval success sync "
          f"{med[0]['eval']:.2f}, async {med[staleness]['eval']:.2f}")
    return ratio


def _caveats(server_threads: int, trainer_threads: int) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {os.cpu_count()} cores, load average (1, 5, 15 min) {load}; trainer "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} torch threads "
            f"{trainer_threads}, engine server {server_threads} thread(s); other jobs share "
            f"the cores, so compare ratios, not absolute rates")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="(a) train steps per setting")
    parser.add_argument("--seeds", type=int, default=3, help="(a) runs per setting")
    parser.add_argument("--model-steps", type=int, default=24, help="(b) train steps")
    parser.add_argument("--repeats", type=int, default=2, help="(b) runs per setting")
    parser.add_argument("--inference", choices=("server", "in_process", "both"),
                        default="server", help="(b) where the speaker's engine runs")
    parser.add_argument("--staleness", type=int, default=2, help="(b) the async max_staleness")
    parser.add_argument("--server-threads", type=int, default=1, help="(b) engine server threads")
    parser.add_argument("--trainer-threads", type=int, default=1, help="(b) trainer threads")
    parser.add_argument("--train-workers", action="store_true",
                        help="(b) train in a worker process (train: {workers: true})")
    parser.add_argument("--workload", choices=(*WORKLOADS, "both"), default="both",
                        help="(b) the real-model workload(s): generation-heavy arithmetic, "
                             "one-token signaling")
    parser.add_argument("--lr", type=float, default=None,
                        help="(b) override the workload's learning rate; a tiny one (1e-12) "
                             "keeps the policy (and so its output lengths) fixed: throughput at equal work per "
                             "sample on both sides")
    parser.add_argument("--quick", action="store_true", help="(a) 80 steps, (b) 1 run")
    parser.add_argument("--wall", action="store_true", help="(a) also on the real clock")
    parser.add_argument("--skip-model", action="store_true", help="only (a)")
    parser.add_argument("--only-model", action="store_true", help="only (b)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.repeats = 80, 1, 1
    if args.staleness < 1:
        parser.error("--staleness is the async run's max_staleness; it must be >= 1")
    import torch

    torch.set_num_threads(args.trainer_threads)
    if not args.only_model:
        report_generation_bound(GENERATION_BOUND, args.steps, args.seeds)
        report_train_bound(TRAIN_BOUND, args.steps, args.seeds)
        if args.wall:
            for cfg in (GENERATION_BOUND, TRAIN_BOUND):
                report_wall(cfg, args.steps)
    if not args.skip_model:
        kinds = ("server", "in_process") if args.inference == "both" else (args.inference,)
        print(f"    before: {_caveats(args.server_threads, args.trainer_threads)}")
        workloads = (list(WORKLOADS.values()) if args.workload == "both"
                     else [WORKLOADS[args.workload]])
        if args.lr is not None:
            workloads = [replace(w, lr=args.lr) for w in workloads]
        for workload in workloads[::-1]:  # arithmetic (the headline) first
            for kind in kinds:
                report_model(args.model_steps, args.repeats, kind, args.staleness,
                             args.server_threads, args.trainer_threads, args.train_workers,
                             workload)
        print(f"    after: {_caveats(args.server_threads, args.trainer_threads)}")


if __name__ == "__main__":
    main()
