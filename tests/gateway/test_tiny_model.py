"""The gateway on a real tiny model (LocalEngine), in process and over a port.

Token ids and log-probs in responses must equal a direct forward pass of the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import openai
import pytest
import torch

from areal_agents.engines.local import LocalEngine
from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread, free_port
from areal_agents.models import tiny

MSGS = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(params=["asgi", "http"])
async def live(request):
    from areal_agents.client import async_client_for_url, client_for_url

    model, tok = tiny("xs", seed=0)
    engine = LocalEngine(model, tok, max_batch_size=8)
    gw = Gateway(admin_key="k")
    gw.add_policy("tiny", [engine], tok)
    opened = []

    def track(factory):
        def make(key="k"):
            opened.append(factory(key))
            return opened[-1]
        return make

    if request.param == "asgi":
        yield gw, engine, tok, track(gw.async_client), track(gw.client)
    else:
        with ServerThread(gw.app) as server:
            yield (gw, engine, tok, track(lambda key: async_client_for_url(server.url, key)),
                   track(lambda key: client_for_url(server.url, key)))
    for client in opened:
        result = client.close()
        if hasattr(result, "__await__"):
            await result
    if gw._portal is not None:
        gw._portal.close()


def forward_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    rows = logp[len(prompt) - 1: len(prompt) + len(completion) - 1]
    return rows, rows[torch.arange(len(completion)), torch.tensor(completion)].tolist()


async def test_logprobs_equal_forward_pass(live):
    _gw, engine, tok, make_async, _ = live
    r = await make_async().chat.completions.create(
        model="tiny", messages=MSGS, temperature=1.0, max_tokens=12, seed=7, logprobs=True)
    prompt = r.model_extra["prompt_token_ids"]
    completion = r.choices[0].model_extra["token_ids"]
    assert prompt == tok(tok.apply_chat_template(MSGS, tokenize=False,
                                                 add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    _, expected = forward_logprobs(engine.model, prompt, completion)
    got = [c.logprob for c in r.choices[0].logprobs.content]
    assert got == pytest.approx(expected, abs=1e-4)
    assert r.usage.completion_tokens == len(completion)


async def test_greedy_matches_argmax_and_streams(live):
    _gw, engine, _tok, make_async, _ = live
    client = make_async()
    r = await client.chat.completions.create(model="tiny", messages=MSGS, temperature=0,
                                             max_tokens=10)
    prompt = r.model_extra["prompt_token_ids"]
    completion = r.choices[0].model_extra["token_ids"]
    rows, _ = forward_logprobs(engine.model, prompt, completion)
    assert rows.argmax(-1).tolist() == completion
    stream = await client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(completion)


def test_sync_n_samples_and_errors(live):
    _gw, _engine, _tok, _, make_sync = live
    client = make_sync()
    r = client.chat.completions.create(model="tiny", messages=MSGS, n=3, max_tokens=5, seed=1)
    assert len(r.choices) == 3
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10**6)
    with pytest.raises(openai.AuthenticationError):
        make_sync("wrong").chat.completions.create(model="tiny", messages=MSGS)


async def test_session_samples_match_engine_on_real_model(live):
    gw, engine, _tok, make_async, _ = live
    key = await gw.create_session("tiny")
    client = make_async(key)
    msgs = list(MSGS)
    for k in range(3):
        r = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                                 seed=k)
        msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": f"again {k}"}]
    samples, report = gw.session(key).to_samples(reward=1.0)
    turns = gw.session(key).turns
    # a merge needs each reply to round-trip through the template exactly; count splits
    assert report.num_splits == 0 and report.num_samples == 1
    for s in samples:
        gen = [i for i, m in enumerate(s.loss_mask) if m]
        _, expected = forward_logprobs(engine.model, s.token_ids[:gen[0]],
                                       s.token_ids[gen[0]:])
        got = {i: s.logprobs[i] for i in gen}
        for i in gen:  # every generated token's behaviour log-prob, at temperature 1
            assert got[i] == pytest.approx(expected[i - gen[0]], abs=1e-4)
    assert sum(s.num_generated for s in samples) == sum(len(t.completion_ids) for t in turns)


@pytest.mark.slow
def test_cli_serve_subprocess(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AREAL_AGENTS_ADMIN_KEY": "cli-key"}
    proc = subprocess.Popen([sys.executable, "-m", "areal_agents.cli", "serve", "--model",
                             "tiny", "--policy", "tiny", "--port", str(port)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(api_key="cli-key", base_url=f"http://127.0.0.1:{port}/v1",
                               max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4)
        assert 1 <= len(r.choices[0].model_extra["token_ids"]) <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
