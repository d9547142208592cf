"""The training-backend contract shared by the Archon, FSDP and Megatron backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from areal_agents.samples import TokenBatch

LossFn = Callable[[torch.Tensor, torch.Tensor, TokenBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(logprobs, entropy, micro_batch) -> (loss, stats)``.

``logprobs`` and ``entropy`` are ``[b, t]`` for the micro-batch, aligned with its
``input_ids`` (position 0 is 0; see ``areal_agents.samples``), computed under each row's
sampling distribution: ``micro_batch.temperature``, then ``top_k``, then ``top_p`` over the kept
set, renormalised (the engines' definition of ``old_logprobs``, ``trainers/logprobs.py``), so
on-policy ratios are exactly 1. They are computed only where the loss reads them
(``loss_mask`` or ``loss_weights`` non-zero, ``trainers/step.py: loss_positions``) and are 0
elsewhere, like padding. ``loss`` is this micro-batch's *share* of the batch loss (the
algorithm normalises with batch-global ``loss_weights``), so micro-batch losses add up to the
batch loss; ``stats`` add up the same way.
"""


class TrainEngine:
    """One trainable policy on one backend.

    Contract:
        * ``forward_logprobs(batch)`` -> ``[B, T]`` log-probs of ``batch.input_ids`` (no grad)
          under each row's sampling params (``batch.temperature``, ``top_k``, ``top_p``, per
          row; greedy rows at temperature 1; see ``trainers/logprobs.py``), aligned as in
          ``areal_agents.samples``; padded positions are 0. ``train_step`` gives ``loss_fn``
          log-probs under the same definition.
        * ``train_step(batch, loss_fn)`` splits the batch into micro-batches by a token
          budget, accumulates gradients, clips the grad norm, takes one optimizer and LR
          step, and returns stats (``loss``, ``grad_norm``, ``lr``, plus ``loss_fn``'s stats).
        * ``export_weights()`` yields ``(hf_name, full_tensor)`` pairs for the inference
          engines (on every rank under FSDP it must be called collectively; rank 0 yields).
        * ``save(path)`` / ``load(path)`` checkpoint model, optimizer, scheduler, RNG, step and
          version with ``torch.distributed.checkpoint``.

    Attributes:
        step: optimizer steps taken.
        version: the policy version (bumped by the trainer after each weight push).
    """

    step: int = 0
    version: int = 0

    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        raise NotImplementedError

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def save(self, path: str) -> None:
        raise NotImplementedError

    def load(self, path: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free resources. Idempotent."""
