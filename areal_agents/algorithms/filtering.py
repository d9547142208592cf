"""Sample filtering and reward shaping: DAPO dynamic sampling and the overlong penalty."""

from __future__ import annotations

from collections.abc import Sequence

from areal_agents.samples import Sample


def overlong_penalty(
    num_generated: int,
    *,
    max_response_len: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> float:
    """DAPO soft overlong punishment for a response of ``L = num_generated`` tokens.

    With ``L_max = max_response_len`` and buffer ``L_c = overlong_buffer_len``::

        0                                   if L <= L_max - L_c
        -factor * (L - (L_max - L_c)) / L_c if L_max - L_c < L <= L_max
        -factor                             if L > L_max

    Raises:
        ValueError: ``overlong_buffer_len`` not in ``(0, max_response_len]``.
    """
    if not 0 < overlong_buffer_len <= max_response_len:
        raise ValueError(
            f"overlong_buffer_len must be in (0, max_response_len={max_response_len}], "
            f"got {overlong_buffer_len}"
        )
    start = max_response_len - overlong_buffer_len
    if num_generated <= start:
        return 0.0
    if num_generated > max_response_len:
        return -penalty_factor
    return -penalty_factor * (num_generated - start) / overlong_buffer_len


def shaped_rewards(
    samples: Sequence[Sample],
    *,
    max_response_len: int | None = None,
    overlong_buffer_len: int | None = None,
    penalty_factor: float = 1.0,
) -> list[float]:
    """``sample.reward`` plus :func:`overlong_penalty` of ``sample.num_generated``.

    The penalty applies only when both ``max_response_len`` and ``overlong_buffer_len`` are set.
    """
    if max_response_len is None or overlong_buffer_len is None:
        return [float(s.reward) for s in samples]
    return [
        float(s.reward)
        + overlong_penalty(
            s.num_generated,
            max_response_len=max_response_len,
            overlong_buffer_len=overlong_buffer_len,
            penalty_factor=penalty_factor,
        )
        for s in samples
    ]


def drop_zero_variance_groups(
    samples: Sequence[Sample],
    rewards: Sequence[float] | None = None,
    *,
    keep_singletons: bool = False,
) -> tuple[list[Sample], dict[str, int]]:
    """DAPO dynamic sampling: drop every ``(group, agent)`` group whose rewards are all equal.

    Such groups give zero group-relative advantage, hence no gradient. Order of kept samples is
    preserved.

    Args:
        samples: the batch. rewards: rewards to test (e.g. :func:`shaped_rewards`); defaults to
            ``sample.reward``.
        keep_singletons: keep groups of one (which have no variance by definition) instead of
            dropping them.

    Returns:
        ``(kept, dropped)`` with ``dropped`` counting SAMPLES by reason: ``"zero_reward_variance"``
        and ``"singleton_group"``, plus ``"zero_reward_variance_groups"`` and
        ``"singleton_groups"`` counting groups. All four keys are always present.

    Raises:
        ValueError: ``rewards`` has a different length than ``samples``.
    """
    rs = [float(s.reward) for s in samples] if rewards is None else [float(r) for r in rewards]
    if len(rs) != len(samples):
        raise ValueError(f"got {len(rs)} rewards for {len(samples)} samples")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.group, s.agent), []).append(i)
    dropped = {
        "zero_reward_variance": 0,
        "zero_reward_variance_groups": 0,
        "singleton_group": 0,
        "singleton_groups": 0,
    }
    drop: set[int] = set()
    for rows in groups.values():
        if len(rows) == 1:
            if not keep_singletons:
                drop.update(rows)
                dropped["singleton_group"] += 1
                dropped["singleton_groups"] += 1
        elif len({rs[i] for i in rows}) == 1:
            drop.update(rows)
            dropped["zero_reward_variance"] += len(rows)
            dropped["zero_reward_variance_groups"] += 1
    return [s for i, s in enumerate(samples) if i not in drop], dropped
