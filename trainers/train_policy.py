"""One train step of one policy: take a batch, log-probs, advantages, train, push weights.

``train_policy(trainer, name)`` is what the clocks (``clocks.py``) call per due policy:

1. take ``batch_size`` episodes' groups from the rollout controller (sorted by task seed, so
   the row order does not depend on timing) and collate them;
2. in a worker thread: the proximal log-probs (the behaviour ones when no row has a stale
   token on an exact engine, else taken from the train step's own forward, or recomputed
   first when ``prepare`` reads them: ``proximal.py``), the KL reference's, the critic's
   values, ``algorithm.prepare`` (advantages), the engine's ``train_step`` and the critic's
   update;
3. stream the new weights to the serving replicas (pause -> update -> version + 1 -> resume,
   ``weight_push.py``) and let the league snapshot them when due.

With ``inference.colocate`` the replicas pause and offload before step 2 and take their memory
back around the update of step 3 (``colocate.py``).

Returns the policy's metrics (``StepStats.train_metrics``: wait / train / sync seconds).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from areal_agents.samples import collate

from .colocate import colocation_for
from .proximal import (
    ProximalFromForward,
    exact_behaviour,
    prox_in_train_forward,
    proximal_logprobs,
)

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["train_policy"]


async def train_policy(trainer: Trainer, name: str) -> dict[str, float]:
    """One optimizer step of trainable policy ``name``; returns its metrics."""
    t0 = time.perf_counter()
    groups = await trainer.controller.take(name, trainer.controller.controls[name].batch_size)
    groups.sort(key=lambda g: g.seed)  # the batch's row order does not depend on timing
    wait = time.perf_counter() - t0
    samples = [s for g in groups for s in g.samples]
    trainer._step_seeds[name] = [g.seed for g in groups]
    engine = trainer.train_engines[name]
    pad = trainer.tokenizers[name].pad_token_id or 0
    algorithm = trainer.algorithms[name]
    batch = collate(samples, pad_token_id=pad)

    # the proximal recompute is skipped for on-policy rows of exact engines (proximal.py)
    exact = exact_behaviour(trainer.gateway.policies[name].router.engines, engine)
    critic, critic_stats = trainer.critics.get(name), {}

    def work() -> dict[str, float]:
        skipped = 0.0  # the fraction of rows whose behaviour log-probs are the proximal ones
        loss = algorithm.loss
        if algorithm.needs_proximal:
            batch.prox_logprobs, skipped = proximal_logprobs(
                batch, samples, engine, exact=exact, in_forward=prox_in_train_forward(algorithm))
            if batch.prox_logprobs is None:  # from the train forward: no pass of its own
                loss = ProximalFromForward(loss)
        if getattr(algorithm, "needs_reference", False):
            batch.ref_logprobs = trainer.ref_engines[name].forward_logprobs(batch)
        if critic is not None:  # V_old on the trained tokens, before GAE
            batch.values = critic.values(batch)
        # prepare after the log-probs: with kl_in_reward it reads batch.ref_logprobs
        prepared = algorithm.prepare(batch, samples)
        trainer.sample_log.stage(name, samples, prepared.advantages,
                                 trainer.controller.controls[name].version,
                                 trainer.tokenizers[name])
        # critic warm-up (CriticSpec.warmup_steps): the critic learns, the policy is held
        held = critic is not None and critic.warming_up
        stats = {} if held else engine.train_step(prepared, loss)
        if algorithm.needs_proximal:
            stats["prox_recompute_skipped"] = float(skipped)
            stats["prox_from_train_forward"] = float(isinstance(loss, ProximalFromForward))
        if critic is not None:
            critic_stats.update(critic.update(prepared, algorithm))
        return stats

    colocation = colocation_for(trainer.policies[name].inference)  # colocate.py
    t1 = time.perf_counter()
    await colocation.before_train(trainer.gateway, name)  # colocated: pause, offload
    try:
        stats = await asyncio.to_thread(work)
    except BaseException:
        await colocation.after_failed_train(trainer.gateway, name)
        raise
    t2 = time.perf_counter()
    control = trainer.controller.controls[name]
    new_version = control.version + 1

    # streamed bucket by bucket from the train engine (a disk update is written first,
    # while the replicas still serve); weight_push.py
    update = await trainer.weight_pushes[name].update(engine, new_version)

    async def push() -> None:  # pause all -> update all -> resume all (also on failure)
        await colocation.push(trainer.gateway, name, update)

    await trainer.controller.update_weights(name, push, new_version)
    engine.version = new_version
    await trainer.league.after_train(trainer, name, new_version)  # a pool snapshot when due
    metrics = trainer._stats.train_metrics(name, samples, stats, new_version, wait=wait,
                                           train=t2 - t1, sync=time.perf_counter() - t2)
    return metrics | {f"critic/{name}/{k}": v for k, v in critic_stats.items()}
