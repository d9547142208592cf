"""SharedLoRABase: several adapter policies over one train-side base model (FSDP and Archon)."""

from __future__ import annotations

import pytest
import torch
from fsdp._helpers import LORA, make_batch, make_model, ppo_loss

from areal_agents.engines import WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.errors import ConfigError
from areal_agents.trainers.lora_shared import SharedLoRABase


def backend_engine(backend: str, lora=LORA):
    torch.set_num_threads(1)
    if backend == "fsdp":
        from areal_agents.trainers.fsdp import FSDPEngine

        return FSDPEngine(make_model(0), lr=1e-2, lora=lora, token_budget=64)
    from areal_agents.trainers.archon import ArchonEngine

    return ArchonEngine(make_model(0), lr=1e-2, lora=lora)


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
def test_each_adapter_trains_only_itself_over_one_base(backend):
    base = SharedLoRABase(backend_engine(backend))
    speaker = base.adapter("speaker", lr=1e-2, seed=1)
    listener = base.adapter("listener", lr=5e-2, seed=2)
    model = speaker.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    s0, l0 = speaker.adapter_state(), listener.adapter_state()
    assert all(torch.equal(s0[n], l0[n]) == ("lora_B" in n) for n in s0)  # own A, B = 0
    batch = make_batch()
    stats = speaker.train_step(batch, ppo_loss)
    assert stats["grad_norm"] > 0 and speaker.step == 1 and listener.step == 0
    s1, l1 = speaker.adapter_state(), listener.adapter_state()
    # B = 0 at the start, so only B gets a gradient on the first step
    assert all(torch.equal(s1[n], s0[n]) != ("lora_B" in n) for n in s1)
    assert all(torch.equal(l1[n], l0[n]) for n in l1)  # the listener did not
    listener.train_step(batch, ppo_loss)
    assert all(torch.equal(speaker.adapter_state()[n], s1[n]) for n in s1)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())  # the base is untouched
    # each policy has its own optimizer (own lr), the engine steps whichever owns the slot
    assert [speaker.optimizer.param_groups[0]["lr"], listener.optimizer.param_groups[0]["lr"]] \
        == [1e-2, 5e-2]


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
async def test_a_pushed_adapter_serves_what_the_train_engine_computes(backend):
    base = SharedLoRABase(backend_engine(backend))
    speaker = base.adapter("speaker", lr=1e-2, seed=1)
    listener = base.adapter("listener", lr=1e-2, seed=2)
    batch = make_batch()
    for view in (speaker, listener):
        view.train_step(batch, ppo_loss)
    names = [n for n, _ in speaker.export_weights()]
    assert names and all(n.startswith("base_model.model.model.layers.") for n in names)
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    tok = _tokenizer()
    async with LocalEngine(make_model(0), tok) as engine:
        served = {}
        for view in (speaker, listener):
            served[view.name] = engine.add_adapter(view.name, rank=4, alpha=8,
                                                   target_modules=["q_proj", "v_proj"])
            await served[view.name].update_weights(WeightUpdate(
                named_tensors=view.export_weights()))
        ids = batch.input_ids[0, : int(batch.attention_mask[0].sum())].tolist()
        for view in (speaker, listener):
            trained = view.forward_logprobs(batch)[0, 1 : len(ids)]
            with torch.no_grad(), engine._lora.rows([view.name]):
                logits = engine.model(torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            torch.testing.assert_close(lp, trained, atol=1e-4, rtol=0)


def _tokenizer():
    from areal_agents.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


def test_an_engine_without_lora_is_refused():
    from areal_agents.trainers.fsdp import FSDPEngine

    with pytest.raises(ConfigError, match="needs an engine built with lora="):
        SharedLoRABase(FSDPEngine(make_model(0), lr=1e-3))


def test_a_checkpoint_restores_values_optimizer_and_step(tmp_path):
    base = SharedLoRABase(backend_engine("fsdp"))
    speaker = base.adapter("speaker", lr=1e-2)
    listener = base.adapter("listener", lr=1e-2, seed=3)
    speaker.train_step(make_batch(), ppo_loss)
    speaker.save(str(tmp_path))
    saved = speaker.adapter_state()
    speaker.train_step(make_batch(seed=2), ppo_loss)
    listener.train_step(make_batch(), ppo_loss)  # the listener owns the slot now
    speaker.load(str(tmp_path))
    assert speaker.step == 1
    assert all(torch.equal(speaker.adapter_state()[n], t) for n, t in saved.items())


class _Busy:
    """A lock another policy's train step holds: entering it is a failure here."""

    def __enter__(self):
        raise AssertionError("export_weights waited for the shared slot")

    def __exit__(self, *exc):
        return False


def test_a_push_reads_the_export_taken_after_its_own_step():
    base = SharedLoRABase(backend_engine("fsdp"))
    speaker = base.adapter("speaker", lr=1e-2)
    listener = base.adapter("listener", lr=1e-2, seed=3)
    speaker.train_step(make_batch(), ppo_loss)
    listener.train_step(make_batch(), ppo_loss)  # the listener owns the slot now
    expected = {n: t.clone() for n, t in speaker.export_weights()}
    base.lock = _Busy()  # the listener is mid-step in another thread
    pushed = dict(speaker.export_weights())
    assert pushed.keys() == expected.keys()
    assert all(torch.equal(pushed[n], t) for n, t in expected.items())


def test_an_adapter_trains_exactly_as_a_lone_lora_engine_whatever_else_uses_the_slot():
    # issue 21's learning gap: the swap must be invisible. The first adapter (the engine's
    # own A) follows a plain LoRA engine's trajectory bit for bit although another adapter
    # trains and the KL reference computes between its steps.
    from areal_agents.trainers.fsdp import FSDPEngine

    torch.set_num_threads(1)
    plain = FSDPEngine(make_model(0), lr=1e-2, lora=LORA, token_budget=64)
    base = SharedLoRABase(backend_engine("fsdp"))
    speaker = base.adapter("speaker", lr=1e-2)
    listener, reference = base.adapter("listener", lr=1e-2, seed=3), base.reference()
    batch = make_batch()
    for engine in (plain, speaker):
        for _ in range(3):
            if engine is speaker:
                listener.train_step(batch, ppo_loss)
                reference.forward_logprobs(batch)
            batch.old_logprobs = engine.forward_logprobs(batch).detach()
            engine.train_step(batch, ppo_loss)
    torch.testing.assert_close(speaker.forward_logprobs(batch), plain.forward_logprobs(batch),
                               rtol=0, atol=0)
    gain = ((speaker.forward_logprobs(batch) - reference.forward_logprobs(batch))
            * batch.advantages).sum()
    assert gain > 0  # positive-advantage tokens gained log-prob over the base
