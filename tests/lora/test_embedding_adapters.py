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
from areal_agents.trainers.lora_shared import SharedLoRABase, embedding_b_init

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


def test_an_embedding_adapter_starts_at_linear_lora_scale_not_peft_normal():
    """PEFT draws an embedding adapter's B from N(0, 1); with A = 0 the first AdamW steps then
    move a token's embedding by more than its norm (Signaling diverged). The shared base
    starts every embedding adapter at B ~ U(+-1/sqrt(r)), the same for every adapter."""
    from areal_agents.trainers.fsdp import FSDPEngine

    torch.set_num_threads(1)
    engine = FSDPEngine(make_model(0, tie=False), lr=1e-2, lora=LORA, token_budget=64)
    peft_b = next(p for n, p in engine.trainable_parameters().items() if "lora_embedding_B" in n)
    assert peft_b.detach().abs().max() > 1.0  # PEFT's N(0, 1) (64 x 4 draws)
    base = SharedLoRABase(engine)
    views = [base.adapter("speaker", lr=1e-2, seed=1), base.adapter("listener", lr=1e-2, seed=2)]
    for view in views:
        state = view.adapter_state()
        b = next(t for n, t in state.items() if "lora_embedding_B" in n)
        assert b.shape == (64, 4) and float(b.abs().max()) <= 0.5  # 1/sqrt(r), r = 4
        torch.testing.assert_close(b, embedding_b_init(b.shape), rtol=0, atol=0)
        a = next(t for n, t in state.items() if "lora_embedding_A" in n)
        assert torch.count_nonzero(a) == 0  # the adapter still starts at the base


def test_an_embedding_target_off_fsdp_is_refused():
    import areal_agents as aa
    from areal_agents.trainers.lora_policies import check_adapter_policies

    lora = {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}
    base = aa.Policy(model="tiny:xs", frozen=True)
    check_adapter_policies({"base": base, "a": aa.Policy(adapter_of="base", lora=lora)})
    with pytest.raises(aa.ConfigError, match="embed_tokens is supported on the fsdp backend"):
        check_adapter_policies({"base": base, "a": aa.Policy(adapter_of="base", lora=lora,
                                                             backend="archon")})
