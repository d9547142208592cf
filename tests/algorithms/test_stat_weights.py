"""Logged ratio-like statistics are per-token means whatever the loss aggregation."""

from __future__ import annotations

import pytest
import torch

from areal_agents.algorithms import DrGRPO
from areal_agents.algorithms.registry import ALGORITHMS
from areal_agents.samples import Sample, collate


def _rows():
    # generated lengths 2, 3, 1 (N = 6 tokens); rewards 1, 0, 0 in one group
    return [
        Sample([9, 1, 2], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], reward=1.0, group="g"),
        Sample([9, 3, 4, 5], [0, 1, 1, 1], [0.0, -1.0, -1.0, -1.0], [-1, 0, 0, 0], group="g"),
        Sample([9, 6], [0, 1], [0.0, -1.0], [-1, 0], reward=0.0, group="g"),
    ]


def test_clip_frac_is_a_token_mean_under_seq_mean_token_sum():
    s = _rows()
    algo = DrGRPO(behave_imp_weight_cap=None, kl_coef=0.1)
    assert algo.aggregation == "seq-mean-token-sum"  # loss weights m / 3: they sum to 2
    b = algo.prepare(collate(s), s)
    b.ref_logprobs = b.old_logprobs.clone()
    assert torch.allclose(b.stat_weights, b.loss_mask / 6)
    # A = [2/3, -1/3, -1/3]; clipped: row 0 token 1 (r = e^0.5 > 1.2, A > 0) and row 1's
    # first two tokens (r = e^-0.5 < 0.8, A < 0); row 2 (r > 1 with A < 0) is not clipped
    delta = torch.tensor([[0, 0.5, 0, 0], [0, -0.5, -0.5, 0], [0, 0.5, 0, 0]])
    logp = b.old_logprobs + delta
    entropy = torch.where(b.loss_mask != 0, 2.0, 0.0)
    _, stats = algo(logp, entropy, b)
    assert stats["clip_frac"].item() == pytest.approx(3 / 6)  # was 3 / 3 = 1.0
    assert stats["imp_weight"].item() == pytest.approx(1.0)  # was 6 / 3 = 2.0
    assert stats["entropy"].item() == pytest.approx(2.0)
    kl_tok = torch.exp(-delta) - 1 + delta  # k3 with x = ref - logp = -delta
    assert stats["kl"].item() == pytest.approx(kl_tok[b.loss_mask != 0].mean().item(), rel=1e-6)
    assert stats["weight_sum"].item() == pytest.approx(2.0)  # the loss keeps its weights
    # micro-batches: the sums of their stats are the batch's
    parts = []
    for rows in ([0], [1, 2]):
        mb = b.select(rows)
        width = mb.input_ids.shape[1]
        parts.append(algo(logp[rows][:, :width], entropy[rows][:, :width], mb)[1])
    for key in ("clip_frac", "imp_weight", "entropy", "kl", "approx_kl_prox"):
        assert (parts[0][key] + parts[1][key]).item() == pytest.approx(stats[key].item()), key


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_sets_stat_weights(name):
    s = _rows()
    b = ALGORITHMS[name]().prepare(collate(s), s)
    assert torch.allclose(b.stat_weights, b.loss_mask / 6)


def test_loss_without_stat_weights_names_prepare():
    s = _rows()
    b = DrGRPO().prepare(collate(s), s)
    b.stat_weights = None
    with pytest.raises(ValueError, match=r"call DrGRPO\.prepare\(batch, samples\)"):
        DrGRPO()(b.old_logprobs, b.old_logprobs, b)
