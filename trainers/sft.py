"""Supervised fine-tuning on the RL training engine: NLL on masked tokens (warm starts)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from areal_agents.samples import Sample, TokenBatch, collate
from areal_agents.trainers.base import TrainEngine


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``LossFn``: ``-sum(logprobs * loss_weights)``; with token-mean weights the batch NLL."""
    weights = mb.loss_weights if mb.loss_weights is not None else mb.loss_mask
    loss = -(logprobs * weights).sum()
    return loss, {"entropy": (entropy * weights).sum().detach()}


def token_mean_weights(batch: TokenBatch) -> TokenBatch:
    """Set ``loss_weights = loss_mask / (masked tokens in the batch)``; returns ``batch``."""
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum().clamp(min=1.0)
    return batch


class SFTTrainer:
    """Fit a ``TrainEngine`` to demonstrations (``Sample``s whose ``loss_mask`` marks targets).

    One optimizer step per batch of ``batch_size`` samples; the loss is the token-mean NLL of
    the masked tokens at temperature 1.

    Args:
        engine: any ``TrainEngine`` (e.g. ``FSDPEngine``).
        batch_size: samples per optimizer step.
        pad_token_id: padding id for ``collate``.
        seed: shuffling seed.
        on_step: optional callback ``(step_stats) -> None`` (logging).

    Example:
        >>> trainer = SFTTrainer(FSDPEngine(model, lr=1e-3))  # doctest: +SKIP
        >>> history = trainer.fit(demos, epochs=3)  # doctest: +SKIP
    """

    def __init__(self, engine: TrainEngine, *, batch_size: int = 8, pad_token_id: int = 0,
                 seed: int = 0, on_step: Callable[[dict[str, float]], None] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.engine = engine
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.on_step = on_step
        self._rng = random.Random(seed)

    def _batches(self, samples: Sequence[Sample], shuffle: bool) -> list[TokenBatch]:
        order = list(range(len(samples)))
        if shuffle:
            self._rng.shuffle(order)
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [token_mean_weights(collate([samples[i] for i in c], self.pad_token_id)) for c in chunks]

    def fit(self, samples: Sequence[Sample], epochs: int = 1, shuffle: bool = True,
            stop: Callable[[list[dict[str, float]]], bool] | None = None,
            ) -> list[dict[str, float]]:
        """Train ``epochs`` passes over ``samples``; returns every step's stats (``loss`` = NLL).
        With ``stop``, training ends after the first step at which ``stop(stats so far)`` is
        true (the steps before are those of a run without it).

        Raises:
            ValueError: no samples, or no sample has a masked (target) token.
        """
        if not samples:
            raise ValueError("SFTTrainer.fit() got no samples")
        if not any(s.num_generated for s in samples):
            raise ValueError("no sample has loss_mask == 1 tokens; mark the target tokens to learn")
        history = []
        for epoch in range(epochs):
            for batch in self._batches(samples, shuffle):
                if not batch.loss_mask.any():
                    continue
                stats = self.engine.train_step(batch, nll_loss)
                stats["epoch"] = float(epoch)
                history.append(stats)
                if self.on_step is not None:
                    self.on_step(stats)
                if stop is not None and stop(history):
                    return history
        return history

    def evaluate(self, samples: Sequence[Sample]) -> float:
        """Token-mean NLL of the masked tokens of ``samples`` (no update)."""
        total, count = 0.0, 0.0
        for batch in self._batches(samples, shuffle=False):
            lp = self.engine.forward_logprobs(batch)
            total += float(-(lp * batch.loss_mask).sum())
            count += float(batch.loss_mask.sum())
        return total / max(count, 1.0)
