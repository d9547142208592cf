"""SFTTrainer: masked-token NLL on the FSDP engine; demonstrations become likely."""

from __future__ import annotations

import pytest
import torch

from areal_agents.samples import Sample, collate
from areal_agents.trainers.sft import SFTTrainer, nll_loss, token_mean_weights

from ._helpers import make_engine


def _demos():
    # prompt [1, k] -> answer [k + 10, k + 20] : a deterministic mapping to memorise
    return [Sample([1, k, k + 10, k + 20], [0, 0, 1, 1], [0.0] * 4, [-1] * 4) for k in range(2, 8)]


def test_nll_loss_is_token_mean_over_masked_tokens():
    batch = token_mean_weights(collate(_demos()[:2]))
    lp = torch.randn(batch.input_ids.shape)
    loss, _ = nll_loss(lp, torch.zeros_like(lp), batch)
    assert loss.item() == pytest.approx(-(lp * batch.loss_mask).sum().item() / 4)


def test_fit_lowers_nll_and_history_counts_steps():
    engine = make_engine(lr=1e-2)
    trainer = SFTTrainer(engine, batch_size=4, seed=0)
    demos = _demos()
    before = trainer.evaluate(demos)
    history = trainer.fit(demos, epochs=5)
    assert len(history) == 5 * 2 and engine.step == 10
    assert [h["epoch"] for h in history[:3]] == [0.0, 0.0, 1.0]
    after = trainer.evaluate(demos)
    assert after < before - 1.0


def test_fit_rejects_unusable_data():
    trainer = SFTTrainer(make_engine())
    with pytest.raises(ValueError, match="no samples"):
        trainer.fit([])
    with pytest.raises(ValueError, match="loss_mask"):
        trainer.fit([Sample([1, 2], [0, 0], [0.0, 0.0], [-1, -1])])
    with pytest.raises(ValueError, match="batch_size"):
        SFTTrainer(make_engine(), batch_size=0)
