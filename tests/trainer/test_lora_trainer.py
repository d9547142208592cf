"""LoRA policies through the Trainer: the served model receives the merged weights every step,
on every backend that trains LoRA (FSDP via PEFT, Archon via its native adapters)."""

from __future__ import annotations

import pytest
import torch

import areal_agents as aa

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def odd_length(episode):
    """Reward 1 for an odd-length message: rewards vary within a group, so LoRA gets gradients."""
    said = [m for m in episode.messages["speaker"] if m.get("role") == "assistant"]
    return {"speaker": float(len(said[-1].get("content") or "") % 2)}


def make(backend: str) -> aa.Trainer:
    policy = aa.Policy(lr=1e-2, backend=backend, lora=LORA, api="completions",
                       sampling={"temperature": 1.0, "max_tokens": 3})
    return aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": policy}, policy_map={"speaker": "speaker"},
        agents={"listener": aa.agents.ScriptedAgent(lambda observation: "A")},
        reward_fns=[odd_length], batch_size=4, group_size=2, progress=False)


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
async def test_lora_training_reaches_the_served_model(backend):
    trainer = make(backend)
    try:
        await trainer.setup()
        served = trainer.gateway.policies["speaker"].router.engines[0].model
        before = {k: v.clone() for k, v in served.state_dict().items()}
        history = await trainer.afit(3)
        after = served.state_dict()
        exported = dict(trainer.train_engines["speaker"].export_weights())
    finally:
        await trainer.aclose()
    assert [h["step"] for h in history] == [1, 2, 3]
    assert any(h["policy/speaker/grad_norm"] > 0 for h in history)
    # the served model holds exactly the engine's merged export (plain HF names, no PEFT infixes)
    assert set(exported) <= set(after)
    for name, tensor in exported.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
