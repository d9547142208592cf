"""``FSDPEngine`` runs a prompt shared by several rows (a GRPO group) once per forward
(``trainers/shared_prefix.py``): the same log-probs, losses and updates as the plain forward,
to float rounding, on groups of varied prompt and answer lengths, multi-turn rows and rows
with nothing to train."""

from __future__ import annotations

import pytest
import torch

from areal_agents.samples import Sample, collate
from areal_agents.trainers.microbatch import plan_microbatches
from areal_agents.trainers.shared_prefix import plan_shared_prefix, row_prompts
from fsdp._helpers import LORA, VOCAB, make_engine, many_groups, ppo_loss


def grouped_batch(seed: int = 3):
    """4 prompts (lengths 5-8) x 3 answers (lengths 1-6); one multi-turn row (a second
    prompt turn between two answers) and one row with no trained token."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p in range(4):
        prompt = torch.randint(1, VOCAB, (5 + p,), generator=g).tolist()
        for k in range(3):
            n = 1 + (p + 2 * k) % 6
            answer = torch.randint(1, VOCAB, (n,), generator=g).tolist()
            ids, mask = prompt + answer, [0] * len(prompt) + [1] * n
            if (p, k) == (1, 2):  # multi-turn: tool output (mask 0) then a second answer
                ids, mask = [*ids, 7, 8, 9, 10, 11], [*mask, 0, 0, 0, 1, 1]
            if (p, k) == (2, 1):
                mask = [0] * len(ids)
            lp = [-(0.5 + torch.rand(1, generator=g).item()) if m else 0.0 for m in mask]
            samples.append(Sample(ids, mask, lp, [0 if m else -1 for m in mask],
                                  reward=float((p + k) % 2), group=f"g{p}"))
    batch = collate(samples)
    adv = (batch.rewards - batch.rewards.mean())[:, None].expand_as(batch.loss_mask)
    batch.advantages = adv * batch.loss_mask
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    return batch


def test_the_plan_groups_rows_by_their_prompt():
    batch = grouped_batch()
    plan = plan_shared_prefix(batch.input_ids, batch.attention_mask, batch.loss_mask != 0)
    assert plan is not None
    # 12 rows, 4 prompts; the untrained row keeps its whole length as its own prompt
    assert plan.prefix_ids.shape[0] == 5
    assert plan.group_of_row.tolist()[:6] == [0, 0, 0, 1, 1, 1]
    assert plan.prefix_len.tolist()[:3] == [5, 5, 5]
    for r in range(12):  # prompt + remainder rebuild every row exactly
        g, p, n = int(plan.group_of_row[r]), int(plan.prefix_len[r]), int(plan.row_len[r])
        row = plan.prefix_ids[g, :p].tolist() + plan.suffix_ids[r, : n - p].tolist()
        assert row == batch.input_ids[r, :n].tolist()
    # prompts of 5, 6 and 8 tokens run once instead of 3 times; the 7-token one once instead
    # of twice (its untrained row is its own group)
    assert plan.saved_tokens == 2 * (5 + 6 + 8) + 7


def test_no_plan_when_nothing_is_shared():
    batch = grouped_batch()
    distinct = torch.arange(batch.input_ids.shape[0])[:, None] + 1
    ids = torch.where(batch.attention_mask.bool(), batch.input_ids, 0).clone()
    ids[:, 0] = distinct[:, 0]  # every row's prompt now differs
    assert plan_shared_prefix(ids, batch.attention_mask, batch.loss_mask != 0) is None
    trained_first = (batch.loss_mask != 0).clone()
    trained_first[:, 0] = True  # a loss at position 0 cannot be split
    assert plan_shared_prefix(batch.input_ids, batch.attention_mask, trained_first) is None


@pytest.mark.parametrize("lora", [None, LORA])
def test_shared_prompts_give_the_plain_forwards_logprobs_and_updates(lora):
    batch = grouped_batch()
    shared = make_engine(lora=lora, token_budget=10_000)
    plain = make_engine(lora=lora, token_budget=10_000, share_prompts=False)
    assert shared.share_prompts and not plain.share_prompts
    torch.testing.assert_close(shared.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=1e-5, atol=1e-5)
    saved_by_one_forward = shared.shared_prompt_tokens
    assert saved_by_one_forward > 0 and plain.shared_prompt_tokens == 0
    for _ in range(3):
        a, b = shared.train_step(batch, ppo_loss), plain.train_step(batch, ppo_loss)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["shared_prompt_tokens"] == saved_by_one_forward
        assert "shared_prompt_tokens" not in b
    assert shared.shared_prompt_tokens == 4 * saved_by_one_forward
    for (name, p), (_, q) in zip(shared.module.named_parameters(),
                                 plain.module.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(shared.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_turns_sharing_off():
    assert not make_engine(gradient_checkpointing=True).share_prompts


def _saved_by_length_plan(batch, budget: int) -> int:
    """Tokens sharing saves when micro-batches are planned by length alone (the old plan)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    total = 0
    for rows in plan_microbatches(lengths, budget):
        mb = batch.select(torch.tensor(rows))
        plan = plan_shared_prefix(mb.input_ids, mb.attention_mask, mb.loss_mask != 0)
        total += plan.saved_tokens if plan is not None else 0
    return total


def test_grouped_microbatches_recompute_logprobs_sharing_every_prompt_once():
    """The quick check (one forward each); the training one below is slow."""
    batch = many_groups()
    shared = make_engine(token_budget=80)
    plain = make_engine(token_budget=80, share_prompts=False)
    torch.testing.assert_close(shared.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=1e-5, atol=1e-5)
    assert shared.shared_prompt_tokens == 3 * sum(6 + p % 8 for p in range(10))


@pytest.mark.slow
def test_many_groups_over_several_microbatches_share_like_one_microbatch():
    batch = many_groups()
    budget = 80  # a group costs its prompt (6-13) + 4 x its longest answer: 2 per micro-batch
    saved_in_one = 3 * sum(6 + p % 8 for p in range(10))  # each prompt once, not 4 times
    keys = row_prompts(batch.input_ids, batch.attention_mask, batch.loss_mask != 0)
    whole = plan_shared_prefix(batch.input_ids, batch.attention_mask, batch.loss_mask != 0)
    assert whole.saved_tokens == saved_in_one  # the batch as one micro-batch
    shared = make_engine(token_budget=budget)
    plain = make_engine(token_budget=budget, share_prompts=False)
    plans = plan_microbatches(batch.attention_mask.sum(-1).tolist(), budget, keys)
    assert len(plans) == 5
    torch.testing.assert_close(shared.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=1e-5, atol=1e-5)
    assert shared.shared_prompt_tokens == saved_in_one  # every group kept whole
    assert _saved_by_length_plan(batch, budget) < 0.6 * saved_in_one
    for _ in range(2):
        a, b = shared.train_step(batch, ppo_loss), plain.train_step(batch, ppo_loss)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["shared_prompt_tokens"] == saved_in_one
    for (name, p), (_, q) in zip(shared.module.named_parameters(),
                                 plain.module.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
