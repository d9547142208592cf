"""``ArchonEngine`` runs a prompt shared by several rows (a GRPO group) once per forward
(``trainers/shared_prefix.py`` with ``models.qwen3.PromptKV``): the plain forward's log-probs,
losses and updates to float rounding, in one micro-batch and over several, fused or not, with
LoRA."""

from __future__ import annotations

import pytest
import torch
from fsdp._helpers import many_groups, ppo_loss

from areal_agents.trainers.archon import ArchonEngine

from .archon_helpers import assert_same_run, hf_tiny, run_distributed, train_grouped

WHOLE = 3 * sum(6 + p % 8 for p in range(10))  # many_groups: 10 prompts run once, not 4 times


def _pair(**kwargs):
    hf = hf_tiny("qwen3", seed=1)
    return (ArchonEngine(hf, lr=1e-3, **kwargs),
            ArchonEngine(hf, lr=1e-3, share_prompts=False, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(token_budget=100_000), dict(token_budget=80),
                                    dict(token_budget=80, fused_projections=False, pack=False)],
                         ids=["one-microbatch", "five-microbatches", "unfused-unpacked"])
def test_shared_prompts_give_the_plain_forwards_logprobs(kwargs):
    batch = many_groups()
    shared, plain = _pair(**kwargs)
    assert shared.share_prompts and not plain.share_prompts
    torch.testing.assert_close(shared.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=1e-5, atol=1e-5)
    assert shared.shared_prompt_tokens == WHOLE and plain.shared_prompt_tokens == 0


@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8.0, "target_modules": ["wq", "wv"]}],
                         ids=["full", "lora"])
def test_shared_prompts_give_the_plain_updates(lora):
    batch = many_groups()
    shared, plain = _pair(token_budget=80, lora=lora)
    for _ in range(2):
        a, b = shared.train_step(batch, ppo_loss), plain.train_step(batch, ppo_loss)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["shared_prompt_tokens"] == WHOLE and "shared_prompt_tokens" not in b
    for (name, p), (_, q) in zip(shared.module.named_parameters(),
                                 plain.module.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(shared.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=1e-5, atol=1e-5)


def test_sharing_is_off_where_unsupported():
    hf = hf_tiny("qwen3_moe", seed=1)
    assert not ArchonEngine(hf, lr=1e-3).share_prompts  # MoE: the router's aux loss per pass
    assert not ArchonEngine(hf_tiny("qwen3"), activation_checkpoint="full").share_prompts


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_fsdp2_ranks_sharing_equal_one_process_without(tmp_path):
    single = train_grouped({"share_prompts": False})
    results = run_distributed(train_grouped, 2, str(tmp_path), engine_kwargs={"dp_shard": 2})
    assert results[0]["shares"] and not single["shares"]
    assert_same_run(single, results[0], atol=1e-5)
    assert results[0]["stats"] == results[1]["stats"]
    assert 0 < results[0]["stats"][0]["shared_prompt_tokens"] < WHOLE  # groups dealt by length
