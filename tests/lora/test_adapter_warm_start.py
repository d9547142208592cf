"""Per-role warm start of adapter policies: each adapter SFT'd on its own role's demos alone."""

from __future__ import annotations

import pytest
import torch
from fsdp._helpers import make_batch, ppo_loss

import areal_agents as aa
from areal_agents.algorithms import GRPO
from areal_agents.samples import Sample
from areal_agents.trainers.lora_policies import check_adapter_policies, untie_embeddings
from areal_agents.trainers.lora_shared import SharedLoRABase
from areal_agents.trainers.warm_start import WarmStartPlan

from .test_shared_base import backend_engine
from .test_trainer_adapters import adapter, make


def demos(seed: int = 3, num: int = 8) -> list[Sample]:
    """Random prompts, all answered by token 40 (what a small adapter can fit in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = [*torch.randint(1, 30, (5,), generator=g).tolist(), 40]
        out.append(Sample(ids, [0] * 5 + [1], [0.0] * 6, [-1] * 5 + [0]))
    return out


@pytest.mark.parametrize("backend", ["fsdp", "archon"])
def test_an_adapters_warm_start_fits_only_that_adapter(backend):
    base = SharedLoRABase(backend_engine(backend))
    speaker = base.adapter("speaker", lr=1e-3, seed=1)
    listener = base.adapter("listener", lr=2e-3, seed=2)
    listener.train_step(make_batch(), ppo_loss)  # the listener owns the slot and an AdamW state
    model = speaker.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    s0, l0 = speaker.adapter_state(), listener.adapter_state()
    l_opt = {k: v.clone() for k, v in listener.optimizer.state_dict()["state"][0].items()}

    losses = speaker.warm_start(WarmStartPlan(demos(), steps=20, lr=5e-2, batch_size=8))

    assert len(losses) == 20 and losses[-1] < 0.75 * losses[0]  # it fits its own demos
    s1 = speaker.adapter_state()
    assert any(not torch.equal(s1[n], s0[n]) for n in s1 if "lora_B" in n)
    for n, t in listener.adapter_state().items():  # the other adapter: bit for bit
        torch.testing.assert_close(t, l0[n], rtol=0, atol=0, msg=n)
    for k, v in listener.optimizer.state_dict()["state"][0].items():  # and its AdamW state
        torch.testing.assert_close(v, l_opt[k], rtol=0, atol=0)
    after = dict(model.named_parameters())
    for n, t in frozen.items():  # the base: bit for bit
        torch.testing.assert_close(after[n], t, rtol=0, atol=0, msg=n)
    # RL restarts from the fitted adapter: a fresh optimizer at its own lr, step and version 0
    assert (speaker.step, speaker.version, listener.step) == (0, 0, 1)
    assert speaker.optimizer.param_groups[0]["lr"] == 1e-3 and not speaker.optimizer.state
    exported = dict(speaker.export_weights())
    assert any(torch.count_nonzero(t) for n, t in exported.items() if "lora_B" in n)
    # its reference is the fitted adapter; the base's reference (zero adapter) differs
    ref = base.reference_of(speaker)
    batch = make_batch()
    torch.testing.assert_close(ref.forward_logprobs(batch), speaker.forward_logprobs(batch),
                               rtol=0, atol=0)
    assert not torch.allclose(base.reference().forward_logprobs(batch),
                              speaker.forward_logprobs(batch))
    stats = speaker.train_step(batch, ppo_loss)  # and RL steps it with its own optimizer
    assert stats["grad_norm"] > 0 and speaker.step == 1 and speaker.optimizer.state


def test_sft_steps_on_an_adapter_policy_is_allowed_the_rest_still_refused():
    base = aa.Policy(model="tiny:xs", frozen=True)
    check_adapter_policies({"base": base, "speaker": adapter(sft_steps=3)})
    with pytest.raises(aa.ConfigError, match="ref_model is not supported for adapter"):
        check_adapter_policies({"base": base, "speaker": adapter(sft_steps=3, ref_model="x")})


@pytest.mark.slow
async def test_the_trainer_warm_starts_each_adapter_on_its_own_agents_demos(tmp_path):
    trainer = make("fsdp", run_dir=tmp_path, algorithm=GRPO(kl_coef=0.05),
                   warm_start={"episodes": 4, "players": {"speaker": "random",
                                                          "listener": "random"}})
    trainer.policies["base"].sft_steps = 3  # the shared base first, untied
    trainer.policies["speaker"].sft_steps = 6  # the listener: no warm start of its own
    trainer.policies["speaker"].sft_lr = 1e-2
    logged = []
    trainer.logger.log = lambda step, metrics: logged.append(metrics)
    try:
        await trainer.setup()
        engine = trainer.gateway.policies["base"].router.engines[0]
        views = {p: trainer.train_engines[p] for p in ("speaker", "listener")}
        state = {p: views[p].adapter_state() for p in views}
        exported = dict(views["speaker"].export_weights())
        layer = engine._lora._layers["model.layers.0.self_attn.q_proj"]
        served_b = {p: layer.lora_b[engine._lora._slots[p]].clone() for p in views}
        refs = {p: trainer.ref_engines[p] for p in views}
        saved = torch.load(tmp_path / "checkpoints/reference/speaker.pt", weights_only=True)
        served_base = engine.model
        train_base = views["speaker"].model
    finally:
        await trainer.aclose()
    for m in (served_base, train_base):  # untied on both sides before the shared warm start
        assert m.lm_head.weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()
        assert not m.config.tie_word_embeddings
    fit = {k: v for m in logged for k, v in m.items() if k.startswith("warm_start/speaker")}
    assert fit["warm_start/speaker/nll_last"] < fit["warm_start/speaker/nll_first"]
    assert not any(k.startswith("warm_start/listener/nll") for m in logged for k in m)
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.count_nonzero(exported[b]) > 0  # the speaker serves its fitted adapter
    torch.testing.assert_close(served_b["speaker"], exported[b], rtol=0, atol=0)
    assert torch.count_nonzero(served_b["listener"]) == 0  # the listener starts at the base
    assert all(torch.count_nonzero(t) == 0 for n, t in state["listener"].items() if "lora_B" in n)
    # KL references: the speaker's fitted adapter (saved for resume), the listener's the base
    for n, t in state["speaker"].items():
        torch.testing.assert_close(refs["speaker"].values[n], t, rtol=0, atol=0)
        torch.testing.assert_close(saved[n], t, rtol=0, atol=0)
    assert all(torch.count_nonzero(t) == 0 for n, t in refs["listener"].values.items()
               if "lora_B" in n)


def test_untie_embeddings_keeps_the_outputs_and_separates_the_head():
    from areal_agents.models.tiny import tiny

    model, _ = tiny("xs", seed=0)
    ids = torch.tensor([[5, 17, 90, 3]])
    with torch.no_grad():
        before = model(ids).logits
    assert untie_embeddings(model) and not untie_embeddings(model)  # tied once, then not
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() != embedding.data_ptr()
    kept = embedding.detach().clone()
    with torch.no_grad():  # a change of the head no longer moves the input rows
        model.lm_head.weight.add_(1.0)
    torch.testing.assert_close(embedding, kept, rtol=0, atol=0)
    assert "lm_head.weight" in dict(model.named_parameters())


@pytest.mark.slow
async def test_a_resumed_run_serves_the_warm_started_base_not_the_original(tmp_path):
    """A resume skips the warm start and the adapters' checkpoints hold only adapters: the
    warm-started (untied) base is saved when the run starts and loaded on resume, on the
    serving and the training side."""
    def build(**kw) -> aa.Trainer:
        trainer = make("fsdp", run_dir=tmp_path, **kw)
        trainer.policies["base"].sft_steps = 3
        return trainer

    first = build(checkpoint_every=1, warm_start={
        "episodes": 4, "players": {"speaker": "random", "listener": "random"}})
    try:
        await first.afit(1)
        fitted = {n: t.clone() for n, t in first.gateway.policies["base"].router.engines[0]
                  .model.state_dict().items() if "lora" not in n}
    finally:
        await first.aclose()
    second = build(resume=True)
    try:
        await second.setup()
        served = second.gateway.policies["base"].router.engines[0].model
        trained = second.train_engines["speaker"].model
        restored = {n: t for n, t in served.state_dict().items() if "lora" not in n}
        trained_head = trained.get_output_embeddings().weight.detach().clone()
    finally:
        await second.aclose()
    from areal_agents.models.tiny import tiny

    original, _ = tiny("xs", seed=0)
    name = "model.embed_tokens.weight"
    assert not torch.equal(fitted[name], original.state_dict()[name])  # the warm start moved it
    assert restored.keys() == fitted.keys()
    for n, t in fitted.items():
        torch.testing.assert_close(restored[n], t, rtol=0, atol=0)
    assert served.lm_head.weight.data_ptr() != served.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(trained_head, fitted["lm_head.weight"], rtol=0, atol=0)
