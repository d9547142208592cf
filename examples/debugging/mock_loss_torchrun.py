"""Debug a loss or a training backend on mock data, with no env, rollouts or server.

Each rank builds its own random batch (prompt tokens with mask 0, "generated" tokens with mask
1, made-up behaviour log-probs, rewards and group-relative advantages), takes ``--steps``
train steps of the tiny model on the FSDP backend with the loss below, and checks what must
hold for data parallelism: the ranks' weights stay identical (same log-probs of a shared
probe batch). Swap in your own loss (same
signature as ``clipped_loss``) or backend and watch the per-rank numbers.

    torchrun --nproc-per-node 2 examples/debugging/mock_loss_torchrun.py --out report.json
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
import torch.distributed as dist

import areal_agents as aa
from areal_agents.samples import Sample, TokenBatch, collate
from areal_agents.trainers.fsdp import FSDPEngine


def mock_batch(vocab_size: int, num: int, seed: int) -> TokenBatch:
    """``num`` random sequences with a masked prompt and a generated tail, rewards 0/1."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        n_prompt, n_gen = 4 + i % 3, 3 + i % 4
        ids = torch.randint(1, vocab_size, (n_prompt + n_gen,), generator=g).tolist()
        logprobs = (-torch.rand(n_gen, generator=g) * 2 - 0.5).tolist()
        samples.append(Sample(ids, [0] * n_prompt + [1] * n_gen, [0.0] * n_prompt + logprobs,
                              [-1] * n_prompt + [0] * n_gen, reward=float(i % 2), group="mock"))
    batch = collate(samples)
    batch.advantages = (batch.rewards - batch.rewards.mean())[:, None] * batch.loss_mask
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    return batch


def clipped_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch,
                 clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss under debug: token-level PPO clip (conforms to ``TrainEngine``'s LossFn)."""
    ratio = torch.exp((logprobs - mb.old_logprobs) * mb.loss_mask)
    per_token = -torch.minimum(ratio * mb.advantages,
                               ratio.clamp(1 - clip_eps, 1 + clip_eps) * mb.advantages)
    return (per_token * mb.loss_weights).sum(), {"ratio_max": ratio.max().detach()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="rank 0 writes a JSON report here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _ = aa.models.tiny("xs", seed=0)  # same initial weights on every rank
    engine = FSDPEngine(model, lr=1e-3)
    batch = mock_batch(model.config.vocab_size, num=4, seed=100 + rank)  # each rank its rows
    losses = [float(engine.train_step(batch, clipped_loss)["loss"]) for _ in range(args.steps)]
    # identical weights on every rank <=> identical log-probs of one shared probe batch
    probe = engine.forward_logprobs(mock_batch(model.config.vocab_size, num=2, seed=0))
    checksum = probe.double().sum().reshape(1)
    sums = [torch.zeros(1, dtype=checksum.dtype) for _ in range(world)]
    dist.all_gather(sums, checksum)
    print(f"rank {rank}/{world}: losses {losses}, probe log-prob sum {float(checksum):.6f}")
    if rank == 0 and args.out:
        with open(args.out, "w") as fh:
            json.dump({"world_size": world, "losses": losses,
                       "checksums": [float(s) for s in sums]}, fh)
    # the engine (its FSDP mesh holds the process group) goes before the group: left to the
    # interpreter's exit, the group's teardown aborted 1 run in 12-24 ("terminate called
    # without an active exception", SIGABRT) after all the work was done
    del engine, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
