"""The merged export of a (non-shared) LoRA model keeps an embedding adapter's change.

A separate LoRA policy pushes ``export_weights()`` (``merge_lora=True``) to its served model;
with ``embed_tokens`` in ``target_modules`` the merge must add the embedding adapter's
``scaling * (B @ A)^T`` too, not only the linear layers' deltas (it used to drop it: the served
log-probs differed from the trained ones by up to 0.6).
"""

from __future__ import annotations

import pytest
import torch
from fsdp._helpers import make_batch, make_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj", "v_proj"]}


def _engine(tie: bool):
    from areal_agents.trainers.fsdp import FSDPEngine

    torch.set_num_threads(1)
    engine = FSDPEngine(make_model(0, tie=tie), lr=1e-2, lora=LORA, token_budget=64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every adapter tensor non-zero (PEFT starts embedding A at 0)
        for p in engine.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return engine


def _logprobs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids,
                       attention_mask=batch.attention_mask.long()).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(2, batch.input_ids[:, 1:, None])[..., 0]


def test_merged_export_of_an_embedding_adapter_gives_the_adapter_models_logprobs():
    engine = _engine(tie=False)
    adapter = dict(engine.export_weights(merge_lora=False))
    emb_b = next(t for n, t in adapter.items() if "lora_embedding_B" in n)
    assert torch.count_nonzero(emb_b) == emb_b.numel()
    merged = dict(engine.export_weights())
    assert not any("lora" in n for n in merged)
    base = make_model(0, tie=False)
    delta = merged["model.embed_tokens.weight"] - base.model.embed_tokens.weight.detach()
    assert delta.abs().max() > 1e-2  # the embedding adapter's change is in the merged weight

    served = make_model(5, tie=False)  # other init: every weight must come from the export
    result = served.load_state_dict(merged, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    batch = make_batch()
    mask = batch.attention_mask[:, 1:].bool()
    trained = engine.forward_logprobs(batch)[:, 1:]
    torch.testing.assert_close(_logprobs(served, batch)[mask], trained[mask], atol=1e-5,
                               rtol=0)

    # the merge without the embedding delta (what was exported before) is far off
    served.model.embed_tokens.weight.data.copy_(base.model.embed_tokens.weight)
    assert (_logprobs(served, batch)[mask] - trained[mask]).abs().max() > 1e-2


def test_merged_export_refuses_an_embedding_adapter_over_a_tied_head():
    engine = _engine(tie=True)
    with pytest.raises(ValueError, match=r"tied to \['lm_head.weight'\].*untie"):
        dict(engine.export_weights())
    adapter = dict(engine.export_weights(merge_lora=False))  # the adapter alone still exports
    assert any("lora_embedding_A" in n for n in adapter)
