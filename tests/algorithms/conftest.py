"""Fixture factory for algorithm tests: random samples with prompt/observation/generated tokens."""

from __future__ import annotations

import random

import pytest

from areal_agents.samples import Sample


def make_samples(
    seed: int = 0,
    num_groups: int = 3,
    group_size: int = 4,
    roles: tuple[str, ...] = ("a",),
    empty_mask_rows: tuple[int, ...] = (),
    reward_levels: int = 3,
) -> list[Sample]:
    """Samples whose masks interleave observation and generated spans (multi-turn)."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for g in range(num_groups):
        for role in roles:
            for _ in range(group_size):
                n = rng.randint(3, 12)
                mask = [0] + [rng.choice([0, 1, 1]) for _ in range(n - 1)]
                if len(out) in empty_mask_rows:
                    mask = [0] * n
                lp = [-rng.random() * 2 if m else 0.0 for m in mask]
                out.append(
                    Sample(
                        token_ids=[rng.randrange(50) for _ in range(n)],
                        loss_mask=mask,
                        logprobs=lp,
                        versions=[0 if m else -1 for m in mask],
                        reward=float(rng.randrange(reward_levels)),
                        agent=role,
                        group=f"task{g}",
                    )
                )
    return out


@pytest.fixture
def samples_factory():
    return make_samples
