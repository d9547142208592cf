"""LoRA on the LM head (issue 21): the chunked log-prob path (``trainers/lm_head.py``) equals
plain autograd over the model's own logits, trains the head adapter, and serves it."""

from __future__ import annotations

import pytest
import torch
from fsdp._helpers import make_batch, make_model, ppo_loss

from areal_agents.errors import ConfigError
from areal_agents.trainers.lm_head import head_operands
from areal_agents.trainers.logprobs import full_logprobs

TARGETS = ["q_proj", "v_proj", "lm_head"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
HEAD_A = "base_model.model.lm_head.lora_A.weight"
HEAD_B = "base_model.model.lm_head.lora_B.weight"


def fsdp_engine(tie: bool = False, lora=LORA, **kw):
    from areal_agents.trainers.fsdp import FSDPEngine

    torch.set_num_threads(1)
    return FSDPEngine(make_model(0, tie=tie), lr=1e-2, lora=lora, token_budget=64, **kw)


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Nonzero ``B`` everywhere (PEFT starts it at 0, where a missing head term is invisible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_the_head_operands_multiply_to_the_head_output():
    engine = fsdp_engine()
    randomize_adapters(engine.model)
    head = engine.module.base.get_output_embeddings()
    hidden = torch.randn(3, 5, 64)
    x, w = head_operands(head, hidden)
    assert x.shape == (3, 5, 64 + 4) and w.shape == (96, 64 + 4)
    torch.testing.assert_close(x @ w.t(), head(hidden), atol=1e-5, rtol=0)
    plain = torch.nn.Linear(64, 96, bias=False)
    assert head_operands(plain, hidden)[1] is plain.weight


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft's
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_adapter_gradients_equal_autograd_over_peft_logits(tie, temperature):
    engine = fsdp_engine(tie=tie)
    randomize_adapters(engine.model)
    batch = make_batch(temperature=temperature)
    params = {n: p for n, p in engine.trainable_parameters().items() if "lm_head" in n}
    assert sorted(n.rsplit(".", 2)[0].rsplit(".", 1)[-1] for n in params) == ["lora_A", "lora_B"]

    def grads(logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
        engine.model.zero_grad()
        (logprobs * batch.advantages).sum().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    engine.module.eval()
    chunked, _ = engine.module(batch.input_ids, batch.attention_mask, batch.temperature)
    logits = engine.model(input_ids=batch.input_ids,
                          attention_mask=batch.attention_mask.long()).logits
    reference, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask, batch.temperature)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    got, want = grads(chunked), grads(reference)
    for name in params:
        assert want[name].abs().max() > 1e-4, name
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_head_dropout_is_applied_in_training_only():
    engine = fsdp_engine(lora={**LORA, "lora_dropout": 0.5})
    randomize_adapters(engine.model)
    head = engine.module.base.get_output_embeddings()
    hidden = torch.randn(4, 64)
    head.eval()
    torch.testing.assert_close(head_operands(head, hidden)[0], head_operands(head, hidden)[0])
    head.train()
    torch.manual_seed(0)
    x, _ = head_operands(head, hidden)
    torch.manual_seed(0)
    torch.testing.assert_close(x[:, :64] @ head.base_layer.weight.t() + x[:, 64:]
                               @ head.lora_B["default"].weight.t(), head(hidden))
    assert not torch.allclose(x, head_operands(head, hidden)[0])  # a fresh mask


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft's
def test_sft_and_rl_steps_move_the_head_adapter():
    from areal_agents.trainers.sft import nll_loss

    for loss in (ppo_loss, nll_loss):
        engine = fsdp_engine()
        batch = make_batch()
        batch.old_logprobs = engine.forward_logprobs(batch)
        before = {n: t.clone() for n, t in engine.export_weights(merge_lora=False)}
        assert torch.count_nonzero(before[HEAD_B]) == 0  # PEFT: B = 0
        for _ in range(2):
            engine.train_step(batch, loss)
        after = dict(engine.export_weights(merge_lora=False))
        assert torch.count_nonzero(after[HEAD_B]) > 0, loss
        assert not torch.equal(after[HEAD_A], before[HEAD_A]), loss  # A moves once B != 0


def test_a_dora_head_is_refused_with_the_fix():
    engine = fsdp_engine(lora={**LORA, "use_dora": True})
    batch = make_batch()
    with pytest.raises(ConfigError, match=r"variant \(e\.g\. DoRA\).*use_dora=False or drop "
                                          r"lm_head from target_modules"):
        engine.forward_logprobs(batch)


def _trained_views(steps=(0, 1, 0), backend: str = "fsdp"):
    from areal_agents.trainers.lora_shared import SharedLoRABase

    base = SharedLoRABase(fsdp_engine() if backend == "fsdp" else archon_engine())
    views = [base.adapter("speaker", lr=1e-2, seed=1), base.adapter("listener", lr=1e-2, seed=2)]
    batch = make_batch()
    for i in steps:
        views[i].train_step(batch, ppo_loss)
    return base, views


def _recomputed(view, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The train engine's log-probs of ``completion`` after ``prompt`` (temperature 1)."""
    from areal_agents.samples import Sample, collate

    n, k = len(prompt) + len(completion), len(completion)
    batch = collate([Sample(prompt + completion, [0] * (n - k) + [1] * k, [0.0] * n,
                            [-1] * (n - k) + [0] * k)], temperature=1.0)
    return view.forward_logprobs(batch)[0, n - k:]


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
async def test_shared_base_head_adapters_serve_what_they_train(backend):
    import asyncio

    from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
    from areal_agents.engines.local import LocalEngine
    from areal_agents.engines.lora import MultiLoRALinear
    from areal_agents.models.tiny import tiny_tokenizer

    _, views = _trained_views(backend=backend)
    exported = {v.name: dict(v.export_weights()) for v in views}
    for tensors in exported.values():  # the head adapter is part of each slot, PEFT-named
        assert HEAD_A in tensors and torch.count_nonzero(tensors[HEAD_B]) > 0
    assert not torch.equal(exported["speaker"][HEAD_B], exported["listener"][HEAD_B])
    prompt = make_batch().input_ids[0, :4].tolist()
    async with LocalEngine(make_model(0, tie=False), tiny_tokenizer()) as engine:
        served = {v.name: engine.add_adapter(v.name, rank=4, alpha=8, target_modules=TARGETS)
                  for v in views}
        for name, adapter in served.items():
            await adapter.update_weights(WeightUpdate(named_tensors=exported[name].items()))
        assert isinstance(engine.model.lm_head, MultiLoRALinear)
        sampling = SamplingParams(max_tokens=8, temperature=1.0, seed=5)
        # both adapters (and the base) decode in one batch, each row with its own head
        outs = await asyncio.gather(*(served[v.name].generate(GenerateRequest(prompt, sampling))
                                      for v in views),
                                    engine.generate(GenerateRequest(prompt, sampling)))
        for view, out in zip(views, outs, strict=False):
            got = out.outputs[0]
            torch.testing.assert_close(torch.tensor(got.logprobs),
                                       _recomputed(view, prompt, got.token_ids),
                                       atol=1e-5, rtol=0)
        # without its head part the speaker's served log-probs differ: the head adapter is used
        no_head = {n: (torch.zeros_like(t) if "lm_head" in n else t)
                   for n, t in exported["speaker"].items()}
        await served["speaker"].update_weights(WeightUpdate(named_tensors=no_head.items()))
        got = (await served["speaker"].generate(GenerateRequest(prompt, sampling))).outputs[0]
        assert not torch.allclose(torch.tensor(got.logprobs),
                                  _recomputed(views[0], prompt, got.token_ids), atol=1e-3)


def test_a_head_adapter_saves_and_resumes(tmp_path):
    _, views = _trained_views()
    views[0].save(str(tmp_path / "speaker"))
    saved = dict(views[0].export_weights())
    views[0].train_step(make_batch(), ppo_loss)
    _, fresh = _trained_views(steps=())
    fresh[0].load(str(tmp_path / "speaker"))
    restored = dict(fresh[0].export_weights())
    assert restored.keys() == saved.keys() and HEAD_B in restored
    for name, t in saved.items():
        torch.testing.assert_close(restored[name], t, rtol=0, atol=0)
    assert fresh[0].step == 2


def test_the_merged_export_carries_the_head_adapter():
    engine = fsdp_engine()
    randomize_adapters(engine.model)
    merged = dict(engine.export_weights(merge_lora=True))
    assert "lm_head.weight" in merged and not any("lora_" in n for n in merged)
    plain = make_model(0, tie=False)
    plain.load_state_dict(merged)
    ids = make_batch().input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, engine.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def archon_engine(tie: bool = False):
    from areal_agents.trainers.archon import ArchonEngine

    torch.set_num_threads(1)
    return ArchonEngine(make_model(0, tie=tie), lr=1e-2, lora=LORA)


@pytest.mark.parametrize("tie", [False, True])
def test_archon_head_logprobs_and_gradients_equal_autograd_over_its_logits(tie):
    engine = archon_engine(tie)
    randomize_adapters(engine.model)
    head = engine.model.output
    assert head.lora_A.requires_grad and head.lora_B.requires_grad
    batch = make_batch(temperature=0.7)

    def grads(logprobs: torch.Tensor) -> list[torch.Tensor]:
        engine.model.zero_grad()
        (logprobs * batch.advantages).sum().backward()
        return [head.lora_A.grad.clone(), head.lora_B.grad.clone()]

    chunked, _ = engine.module(batch.input_ids, batch.attention_mask, batch.temperature)
    reference, _ = full_logprobs(engine.model(batch.input_ids), batch.input_ids,
                                 batch.attention_mask, batch.temperature)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    for got, want in zip(grads(chunked), grads(reference), strict=True):
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_archon_head_adapter_trains_and_exports_what_peft_loads():
    from peft import PeftModel

    from areal_agents.trainers.archon.lora import save_peft_adapter

    engine = archon_engine()
    batch = make_batch()
    batch.old_logprobs = engine.forward_logprobs(batch)
    for _ in range(2):
        engine.train_step(batch, ppo_loss)
    adapter = dict(engine.export_weights(merge_lora=False))
    assert torch.count_nonzero(adapter[HEAD_B]) > 0 and HEAD_A in adapter
    # PEFT loads the exported adapter (lm_head included) and computes the same log-probs
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        save_peft_adapter(adapter.items(), engine.lora_config, path)
        peft_model = PeftModel.from_pretrained(make_model(0, tie=False), path).eval()
    assert hasattr(peft_model.get_base_model().lm_head, "lora_A")
    with torch.no_grad():
        logits = peft_model(input_ids=batch.input_ids,
                            attention_mask=batch.attention_mask.long()).logits
    reference, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(engine.forward_logprobs(batch), reference, atol=1e-5, rtol=0)
    merged = dict(engine.export_weights(merge_lora=True))
    plain = make_model(0, tie=False)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch.input_ids, attention_mask=batch
                                         .attention_mask.long()).logits, logits, atol=1e-5, rtol=0)


def test_archon_refuses_merging_a_head_adapter_into_a_tied_head():
    engine = archon_engine(tie=True)
    assert "base_model.model.lm_head.lora_B.weight" in dict(engine.export_weights(merge_lora=False))
    with pytest.raises(ValueError, match=r"LM head \(output\) into a head tied.*untie the model "
                                         r"first.*or export merge_lora=False"):
        list(engine.export_weights(merge_lora=True))
