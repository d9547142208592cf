"""LoRA adapters on the input embedding (``embed_tokens``): trained over the shared base,
served per row by ``LocalEngine`` (``MultiLoRAEmbedding``), equal on both sides."""

from __future__ import annotations

import pytest
import torch
from fsdp._helpers import make_batch, make_model, ppo_loss

from areal_agents.engines import WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.lora import MultiLoRAEmbedding, parse_adapter_name
from areal_agents.trainers.lora_policies import _plain_copy
from areal_agents.trainers.lora_shared import SharedLoRABase

TARGETS = ["embed_tokens", "q_proj", "v_proj"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}


def _served_logprobs(engine, name, ids):
    with torch.no_grad(), engine._lora.rows([name]):
        logits = engine.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_peft_embedding_adapter_names_parse():
    assert parse_adapter_name("base_model.model.model.embed_tokens.lora_embedding_A") == (
        "model.embed_tokens", "A")
    assert parse_adapter_name("model.embed_tokens.lora_embedding_B.default") == (
        "model.embed_tokens", "B")
    with pytest.raises(KeyError):
        parse_adapter_name("model.embed_tokens.weight")


async def test_an_embedding_adapter_trains_and_serves_what_the_train_engine_computes():
    from areal_agents.models.tiny import tiny_tokenizer
    from areal_agents.trainers.fsdp import FSDPEngine

    torch.set_num_threads(1)
    base = SharedLoRABase(FSDPEngine(make_model(0, tie=False), lr=1e-2, lora=LORA,
                                     token_budget=64))
    speaker = base.adapter("speaker", lr=1e-2, seed=1)
    listener = base.adapter("listener", lr=1e-2, seed=2)
    emb_a = "base_model.model.model.embed_tokens.lora_embedding_A.default"
    before = {n: t for n, t in speaker.export_weights()}
    assert emb_a in before and torch.count_nonzero(before[emb_a]) == 0  # PEFT: A = 0, B random
    batch = make_batch()
    for view in (speaker, listener, speaker):
        view.train_step(batch, ppo_loss)
    exported = {v.name: dict(v.export_weights()) for v in (speaker, listener)}
    assert torch.count_nonzero(exported["speaker"][emb_a]) > 0  # the embedding adapter trains
    assert not torch.equal(exported["speaker"][emb_a], exported["listener"][emb_a])
    ids = batch.input_ids[0, : int(batch.attention_mask[0].sum())].tolist()
    async with LocalEngine(make_model(0, tie=False), tiny_tokenizer()) as engine:
        served = {}
        for view in (speaker, listener):
            served[view.name] = engine.add_adapter(view.name, rank=4, alpha=8,
                                                   target_modules=TARGETS)
            await served[view.name].update_weights(WeightUpdate(
                named_tensors=exported[view.name].items()))
        assert isinstance(engine.model.model.embed_tokens, MultiLoRAEmbedding)
        for view in (speaker, listener):
            trained = view.forward_logprobs(batch)[0, 1 : len(ids)]
            torch.testing.assert_close(_served_logprobs(engine, view.name, ids), trained,
                                       atol=1e-4, rtol=0)
        # both adapters in one batch: each row its own embedding adapter
        with torch.no_grad(), engine._lora.rows(["speaker", "listener", None]):
            mixed = engine.model(torch.tensor([ids] * 3)).logits.float()
        for row, name in enumerate(("speaker", "listener")):
            lp = torch.log_softmax(mixed[row, :-1], -1).gather(
                1, torch.tensor(ids[1:])[:, None])[:, 0]
            torch.testing.assert_close(lp, _served_logprobs(engine, name, ids), atol=1e-5,
                                       rtol=0)
        # without its embedding part the speaker's served log-probs differ: it is used
        no_emb = {n: (torch.zeros_like(t) if "embed_tokens" in n else t)
                  for n, t in exported["speaker"].items()}
        await served["speaker"].update_weights(WeightUpdate(named_tensors=no_emb.items()))
        assert not torch.allclose(_served_logprobs(engine, "speaker", ids),
                                  speaker.forward_logprobs(batch)[0, 1 : len(ids)], atol=1e-4)
        plain = _plain_copy(engine.model)  # the served base without the adapters' layers
    assert type(plain.model.embed_tokens) is torch.nn.Embedding
    assert "embed_tokens.weight" in dict(plain.model.named_parameters())
