"""The format-only warm start reaches the policy's model on every backend, including engines
that train their own copy of the weights (Archon)."""

from __future__ import annotations

import pytest
import torch

from areal_agents.models import tiny
from areal_agents.trainers.archon import ArchonEngine
from areal_agents.trainers.fsdp.engine import FSDPEngine
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.warm_start import copy_weights_into, warm_start_policy

TRANSCRIPTS = [[{"role": "user", "content": f"target: {c}"}, {"role": "assistant", "content": d}]
               for c, d in zip("ABCDABCD", "01230123", strict=True)]


@pytest.mark.parametrize("factory", [FSDPEngine, ArchonEngine], ids=["fsdp", "archon"])
async def test_warm_start_changes_the_model_the_trainer_serves(factory):
    model, tokenizer = tiny("xs", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = Policy(sft_steps=3, sft_lr=1e-2, api="completions")
    losses = await warm_start_policy(policy, model, tokenizer, factory, TRANSCRIPTS)
    assert len(losses) == 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > 5


def test_copy_weights_into_names_an_unknown_tensor():
    model, _ = tiny("xs", seed=0)
    with pytest.raises(KeyError, match=r"'nope\.weight'.*Hugging Face names"):
        copy_weights_into(model, [("nope.weight", torch.zeros(1))])
