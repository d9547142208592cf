"""Qwen3-MoE policies through the Trainer: weight pushes use the served ``transformers``
model's expert layout; HF checkpoint files keep one tensor per expert (vLLM/SGLang names)."""

from __future__ import annotations

import pytest
import torch
import transformers

import areal_agents as aa
from areal_agents.models import tiny_tokenizer
from areal_agents.models.tiny import SIZES, VOCAB_SIZE
from areal_agents.trainers.archon import ArchonEngine
from areal_agents.trainers.archon.models import archon_to_hf, from_hf
from areal_agents.trainers.archon.models.state_dict import serving_expert_layout


def tiny_moe(seed: int = 0) -> tuple[transformers.PreTrainedModel, object]:
    """A seeded 2-layer Qwen3-MoE (4 experts, top-2) over the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    config = transformers.Qwen3MoeConfig(
        **{**SIZES["xs"], "intermediate_size": 128}, vocab_size=VOCAB_SIZE,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(config).float().eval(), tokenizer


def odd_length(episode):
    """Reward 1 for an odd-length message: rewards vary within a group, so there are gradients."""
    said = [m for m in episode.messages["speaker"] if m.get("role") == "assistant"]
    return {"speaker": float(len(said[-1].get("content") or "") % 2)}


@pytest.mark.parametrize("backend", ["archon", "fsdp"])
async def test_moe_policy_trains_and_reaches_the_served_model(backend):
    policy = aa.Policy(model=tiny_moe(), lr=1e-2, backend=backend, api="completions",
                       sampling={"temperature": 1.0, "max_tokens": 3})
    trainer = aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": policy}, policy_map={"speaker": "speaker"},
        agents={"listener": aa.agents.ScriptedAgent(lambda observation: "A")},
        reward_fns=[odd_length], batch_size=4, group_size=2, progress=False)
    try:
        await trainer.setup()
        served = trainer.gateway.policies["speaker"].router.engines[0].model
        before = {k: v.clone() for k, v in served.state_dict().items()}
        history = await trainer.afit(2)
        after = served.state_dict()
        exported = dict(trainer.train_engines["speaker"].export_weights())
    finally:
        await trainer.aclose()
    assert [h["step"] for h in history] == [1, 2]
    assert set(exported) <= set(after) and set(after) - set(exported) <= {"lm_head.weight"}
    for name, tensor in exported.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
    experts = "model.layers.1.mlp.experts.down_proj"
    assert experts in after and not torch.equal(after[experts], before[experts])


def test_fused_export_is_the_transformers_state_dict():
    assert serving_expert_layout() == "fused"  # transformers >= 5 (pinned by the venv)
    hf, _ = tiny_moe()
    state = hf.state_dict()
    model = from_hf(hf)
    fused = dict(archon_to_hf(model.state_dict(), model.args, experts="fused"))
    assert set(fused) == set(state) - {"lm_head.weight"}
    for name, tensor in fused.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="experts='stacked'; choose 'fused' or 'per_expert'"):
        next(archon_to_hf(model.state_dict(), model.args, experts="stacked"))


def test_save_hf_writes_per_expert_names_that_transformers_loads(tmp_path):
    from safetensors.torch import load_file

    hf, _ = tiny_moe()
    engine = ArchonEngine(hf, lr=1e-3)
    engine.save_hf(str(tmp_path))
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names  # vLLM's loader names
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    ids = torch.randint(0, VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
