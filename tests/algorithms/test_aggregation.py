"""Aggregation weights: values by hand, a float64 per-row reference, additivity, empty masks."""

from __future__ import annotations

import pytest
import torch

from areal_agents.algorithms.aggregation import (
    AGGREGATIONS,
    loss_weights,
    stat_weights,
    weighted_sum,
)

MASK = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_weights_by_hand():
    tm = loss_weights(MASK, "token-mean")
    assert torch.allclose(tm, MASK / 4.0)
    st = loss_weights(MASK, "seq-mean-token-sum")  # two non-empty rows
    assert torch.allclose(st, MASK / 2.0)
    sm = loss_weights(MASK, "seq-mean-token-mean")
    expected = torch.tensor([[0, 1 / 6, 1 / 6, 1 / 6], [0, 1 / 2, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(sm, expected)
    assert tm.dtype == torch.float32
    # Dr.GRPO's constant normaliser: sum / (2 sequences * L); L defaults to the longest row (3)
    assert torch.allclose(loss_weights(MASK, "seq-mean-token-sum-norm"), MASK / 6.0)
    assert torch.allclose(loss_weights(MASK, "seq-mean-token-sum-norm", norm_len=8), MASK / 16.0)
    assert torch.equal(stat_weights(MASK), tm)


def _reference(values, mask, mode):
    """Straightforward float64 per-row aggregation."""
    rows = []
    for v, m in zip(values.tolist(), mask.tolist(), strict=True):
        toks = [x for x, k in zip(v, m, strict=True) if k]
        if toks:
            rows.append(toks)
    if not rows:
        return 0.0
    if mode == "token-mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in rows) / (len(rows) * max(len(r) for r in rows))
    return sum(sum(r) / len(r) for r in rows) / len(rows)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_float64_reference_and_splits_additively(mode, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(7, 9, generator=g) < 0.5).long()
    mask[seed % 7] = 0  # an empty row
    values = torch.randn(7, 9, generator=g, dtype=torch.float64)
    w = loss_weights(mask.double(), mode)
    assert w.dtype == torch.float64
    assert weighted_sum(values, w).item() == pytest.approx(
        _reference(values, mask, mode), abs=1e-12
    )
    parts = weighted_sum(values[:3], w[:3]) + weighted_sum(values[3:], w[3:])
    assert parts.item() == pytest.approx(weighted_sum(values, w).item(), abs=1e-12)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_empty_mask_gives_zero_not_nan(mode):
    w = loss_weights(torch.zeros(2, 3), mode)
    assert (w == 0).all()
    assert weighted_sum(torch.full((2, 3), float("nan")), w).item() == 0.0


def test_errors():
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        loss_weights(MASK, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"loss_mask must be \[batch, seq\]"):
        loss_weights(torch.ones(3), "token-mean")
    with pytest.raises(ValueError, match=r"norm_len must be >= 1 \(or None: the longest row\)"):
        loss_weights(MASK, "seq-mean-token-sum-norm", norm_len=0)
