"""Sample validation, collation and micro-batch selection."""

import pytest
import torch

import areal_agents as aa


def _sample(n_prompt, n_gen, reward=1.0):
    n = n_prompt + n_gen
    return aa.Sample(
        token_ids=list(range(1, n + 1)),
        loss_mask=[0] * n_prompt + [1] * n_gen,
        logprobs=[0.0] * n_prompt + [-0.5] * n_gen,
        versions=[-1] * n_prompt + [3] * n_gen,
        reward=reward,
    )


def test_misaligned_sample_is_rejected_with_the_field_named():
    with pytest.raises(ValueError, match=r"Sample\.logprobs has 1 entries but token_ids has 2"):
        aa.Sample(token_ids=[1, 2], loss_mask=[0, 1], logprobs=[0.0], versions=[-1, 0])


def test_collate_pads_right_and_keeps_alignment():
    batch = aa.collate([_sample(2, 3, 1.0), _sample(1, 1, 0.0)], pad_token_id=99)
    assert batch.input_ids.shape == (2, 5)
    assert batch.input_ids[1].tolist() == [1, 2, 99, 99, 99]
    assert batch.attention_mask[1].tolist() == [True, True, False, False, False]
    assert batch.loss_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert batch.versions[1].tolist() == [-1, 3, -1, -1, -1]
    assert batch.old_logprobs[0, 2].item() == pytest.approx(-0.5)
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert batch.num_tokens == 7


def test_select_trims_padding_of_the_micro_batch():
    batch = aa.collate([_sample(2, 3), _sample(1, 1)])
    batch.advantages = torch.ones_like(batch.loss_mask)
    mb = batch.select([1])
    assert mb.input_ids.shape == (1, 2)
    assert mb.advantages.shape == (1, 2)
    assert mb.rewards.shape == (1,)


def test_collate_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        aa.collate([])
