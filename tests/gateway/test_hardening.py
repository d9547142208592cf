"""Gateway hardening: client mistakes answer 4xx in OpenAI format, rewards are finite and tied
to live sessions and existing turns, ended sessions are dropped (issue 14)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from areal_agents.engines.base import WeightUpdate
from areal_agents.gateway import Gateway
from areal_agents.testing.engine import ScriptedEngine

MSGS = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "param", "code"}


class DiskEngine(ScriptedEngine):
    """A ScriptedEngine that loads ``path`` updates as LocalEngine does: a directory without
    ``*.safetensors`` is a FileNotFoundError."""

    async def update_weights(self, update: WeightUpdate) -> None:
        if update.path is not None and not list(Path(update.path).glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors files in {update.path!r}")
        await super().update_weights(update)


def assert_openai_error(r, status: int, param: str | None = None, code: str | None = None,
                        says: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert says in error["message"]
    if status != 429:
        assert r.headers["x-should-retry"] == "false"  # the SDK must not retry a mistake
    return error


async def open_session(http, policy="tiny"):
    r = await http.post("/rl/sessions", json={"policy": policy})
    assert r.status_code == 200, r.text
    return r.json()["session_id"], r.json()["api_key"]


@pytest.mark.parametrize(("path", "body", "param", "says"), [
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "stream": True,
                              "stream_options": [1]}, "stream_options",
     "'stream_options' must be an object"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS, "stream": True,
                              "stream_options": "usage"}, "stream_options", "got 'usage'"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS,
                              "stream_options": {"include_usage": "yes"}}, "stream_options",
     "'stream_options.include_usage' must be a boolean"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**9]}, "prompt",
     "outside the vocabulary [0, 1024), e.g. 1000000000"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, -1]}, "prompt", "e.g. -1"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, "prompt", "'prompt' is empty"),
    ("/v1/chat/completions", {"model": ["tiny"], "messages": MSGS}, "model",
     "must be the name of a served policy (a string), got ['tiny']"),
    ("/rl/sessions", {"policy": ["tiny"]}, "policy", "got ['tiny']; served: ['tiny']"),
    ("/admin/pause", {"policy": ["tiny"]}, "policy", "(a string)"),
    ("/admin/update_weights", {"policy": ["tiny"], "path": "/x"}, "policy", "(a string)"),
    ("/admin/update_weights", {"path": "/x"}, "policy", "got None"),
    ("/admin/update_weights", {"policy": "tiny", "path": "/x", "version": "v2"}, "version",
     "'version' must be an integer or null, got 'v2'"),
])
async def test_client_mistakes_are_400_not_500(served, path, body, param, says):
    async with served.http() as http:
        r = await http.post(path, json=body)
    assert_openai_error(r, 400, param=param, says=says)


async def test_bad_weight_path_is_400_naming_the_path(tok, tmp_path):
    gw = Gateway(admin_key="k")
    engine = DiskEngine(["ok"], tokenizer=tok)
    gw.add_policy("tiny", [engine], tok)
    missing = str(tmp_path / "nowhere")
    async with _http(gw) as http:
        r = await http.post("/admin/update_weights", json={"policy": "tiny", "path": missing})
    assert_openai_error(r, 400, param="path", code="invalid_weights_path",
                        says=f"could not load weights from {missing!r}: no *.safetensors")
    assert engine.version == 0


async def test_sdk_does_not_retry_a_client_mistake(served):
    client = served.async_client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=MSGS, stream=True,
                                             stream_options=["include_usage"])
    assert err.value.body["param"] == "stream_options"
    assert err.value.response.headers["x-should-retry"] == "false"


async def test_unknown_route_and_wrong_method_answer_openai_json(served):
    async with served.http() as http:
        r = await http.get("/v1/nothing")
        assert_openai_error(r, 404, code="route_not_found",
                            says="no route GET /v1/nothing; GET /openapi.json lists")
        r = await http.get("/v1/responses/resp_1")  # nothing is stored
        assert_openai_error(r, 404, says="POST /v1/responses with the whole conversation")
        r = await http.get("/v1/chat/completions")
        error = assert_openai_error(r, 405, code="method_not_allowed",
                                    says="GET is not allowed on /v1/chat/completions; use POST")
        assert error["type"] == "invalid_request_error" and r.headers["allow"] == "POST"


@pytest.mark.parametrize("raw", [b'{"reward": NaN}', b'{"reward": Infinity}',
                                 b'{"reward": -Infinity}', b'{"reward": 1e999}'])
async def test_non_finite_reward_is_400_and_the_session_stays_readable(served, raw):
    async with served.http() as http:
        sid, _ = await open_session(http)
        r = await http.post(f"/rl/sessions/{sid}/reward", content=raw,
                            headers={"content-type": "application/json"})
        assert_openai_error(r, 400, code="invalid_json", says="JSON has no")
        r = await http.get(f"/rl/sessions/{sid}")
        assert r.status_code == 200 and r.json()["rewards"] == []
        r = await http.post("/rl/sessions", content=b'{"policy": "tiny", "metadata": '
                            b'{"x": NaN}}', headers={"content-type": "application/json"})
        assert_openai_error(r, 400, code="invalid_json")


def test_add_reward_refuses_non_finite_values():
    from areal_agents.gateway import Session

    session = Session(policy="p")
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="a reward must be a finite number"):
            session.add_reward(value)
    assert session.rewards == []


async def test_reward_after_end_is_409(served):
    async with served.http() as http:
        sid, key = await open_session(http)
        kept, _ = await open_session(http)
        assert (await http.post(f"/rl/sessions/{kept}/end", json={"drop": False})).json()[
            "ended"]
        r = await http.post(f"/rl/sessions/{kept}/reward", json={"reward": 1.0})
        assert_openai_error(r, 409, code="session_ended",
                            says=f"session {kept} has ended; post rewards before POST "
                                 "/rl/sessions/{id}/end")
        assert served.gw.session(kept).rewards == []
        async with served.http(key) as own:
            assert (await own.post(f"/rl/sessions/{sid}/end")).status_code == 200
            # dropped, yet a late reward with its own key still hears "ended", not 401
            r = await own.post(f"/rl/sessions/{sid}/reward", json={"reward": 1.0})
            assert_openai_error(r, 409, code="session_ended")
            r = await own.post("/v1/chat/completions", json={"model": "tiny",
                                                               "messages": MSGS})
            assert_openai_error(r, 409, code="session_ended")
        r = await http.post(f"/rl/sessions/{sid}/reward", json={"reward": 1.0})
        assert_openai_error(r, 409, code="session_ended")


async def test_per_turn_rewards_name_an_existing_turn(served):
    async with served.http() as http:
        sid, key = await open_session(http)
        reply = await served.async_client(key).chat.completions.create(
            model="tiny", messages=MSGS)
        async with served.http(key) as own:
            url = f"/rl/sessions/{sid}/reward"
            assert_openai_error(await own.post(url, json={"reward": 1.0, "turn": 1}), 404,
                                param="turn", code="turn_not_found",
                                says="has 1 turn(s); there is no turn 1")
            assert_openai_error(await own.post(url, json={"reward": 1.0, "turn": "0"}), 400,
                                param="turn")
            assert_openai_error(await own.post(url, json={"reward": 1.0,
                                                          "completion_id": "chatcmpl-x"}),
                                404, code="turn_not_found", says="'chatcmpl-x' choice 0")
            assert_openai_error(await own.post(url, json={"reward": 1.0, "turn": 0,
                                                          "completion_id": reply.id}),
                                400, says="not both")
            r = await own.post(url, json={"reward": 0.5, "completion_id": reply.id})
            assert r.json()["turn_rewards"] == {"0": 0.5}
            r = await own.post(url, json={"reward": 0.25, "turn": 0})
            assert r.json()["turn_rewards"] == {"0": 0.75}
            r = await own.post(url, json={"reward": 1.0})
            assert r.json()["rewards"] == [0.5, 0.25, 1.0]
    session = served.gw.session(sid)
    assert session.turn_rewards == {0: 0.75} and session.reward == 1.75
    assert type(session).from_dict(session.to_dict()).turn_rewards == {0: 0.75}


async def test_text_completion_turns_carry_their_completion_id(served):
    async with served.http() as http:
        sid, key = await open_session(http)
    r = await served.async_client(key).completions.create(model="tiny", prompt="abc")
    # recorded before the answer is written: a reader in this thread already sees it
    assert served.gw.session(sid).find_turn(r.id) == 0


async def test_end_drops_the_session_and_hands_it_to_the_sink(served):
    sunk = []
    served.gw.session_sink = sunk.append
    async with served.http() as http:
        sid, key = await open_session(http)
        await served.async_client(key).chat.completions.create(model="tiny", messages=MSGS)
        async with served.http(key) as own:
            r = await own.post(f"/rl/sessions/{sid}/end")
        assert r.json() == {"session_id": sid, "ended": True, "num_turns": 1}
        assert served.gw._sessions == {} and served.gw._session_by_digest == {}
        assert [s.session_id for s in sunk] == [sid] and len(sunk[0].turns) == 1
        health = (await http.get("/health")).json()["sessions"]
        assert health == {"live": 0, "opened": 1, "ended": 1, "abandoned": 0, "expired": 0}
        assert_openai_error(await http.get(f"/rl/sessions/{sid}"), 409, code="session_ended")
        # ending twice is harmless and the sink sees the session once
        async with served.http(key) as own:
            assert (await own.post(f"/rl/sessions/{sid}/end")).status_code == 409
    assert len(sunk) == 1


async def test_end_can_return_the_final_record_or_keep_the_session(served):
    async with served.http() as http:
        sid, key = await open_session(http)
        await served.async_client(key).chat.completions.create(model="tiny", messages=MSGS)
        r = await http.post(f"/rl/sessions/{sid}/end", json={"return_session": True})
        record = r.json()["session"]
        assert record["ended"] and len(record["turns"]) == 1 and sid not in served.gw._sessions
        kept, _ = await open_session(http)
        await http.post(f"/rl/sessions/{kept}/end", json={"drop": False})
        assert served.gw.session(kept).ended
        assert_openai_error(await http.post(f"/rl/sessions/{kept}/end", json={"drop": "no"}),
                            400, param="drop")


def test_ended_memory_is_bounded():
    from areal_agents.gateway.sessions import EndedSessions

    ended = EndedSessions(capacity=2)
    for i in range(3):
        ended.add(f"s{i}", [f"d{i}"])
    assert "s0" not in ended and "s2" in ended and len(ended) == 2
    assert ended.by_digest == {"d1": "s1", "d2": "s2"}


def _http(gw: Gateway):
    import httpx2

    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app),
                              base_url="http://gateway", headers={"Authorization": "Bearer k"})


def test_serve_help_explains_sessions_keys_and_the_flow(capsys):
    from areal_agents.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("session key", "admin key", "POST /rl/sessions", "/v1/chat/completions",
                   "/reward", "/end", '{"reward": 1.0}', "--max-body-bytes", "openapi.json"):
        assert phrase.replace("POST ", "") in text, phrase
    assert text.index("/rl/sessions") < text.index("/v1/chat/completions") < text.index(
        "/reward") < text.index("/end")


def test_startup_banner_shows_keys_and_the_flow(tok):
    from areal_agents.cli_serve import banner

    gw = Gateway(admin_key="secret-admin")
    gw.add_policy("tiny", [ScriptedEngine(["ok"], tokenizer=tok)], tok)
    text = banner(gw, "127.0.0.1", 8123, show_key=True)
    assert "policy 'tiny' on http://127.0.0.1:8123/v1" in text
    assert "admin key: secret-admin" in text
    flow = [line for line in text.splitlines() if "->" in line or line.startswith("flow")]
    assert [s for line in flow for s in ("/rl/sessions {", "/v1/chat/completions", "/reward",
                                         "/end") if s in line] == [
        "/rl/sessions {", "/v1/chat/completions", "/reward", "/end"]
    assert "secret-admin" not in banner(gw, "127.0.0.1", 8123, show_key=False)


async def test_string_prompts_skip_the_vocabulary_size_id_prompts_are_checked(tok,
                                                                             monkeypatch):
    """A string prompt's ids come from the policy's tokenizer, so ``/v1/completions`` does not
    ask it for its vocabulary size (``len(tokenizer)``); a prompt of ids still is checked."""
    gw = Gateway(admin_key="k")
    gw.add_policy("tiny", [ScriptedEngine(["hi"], tokenizer=tok, max_context=512)], tok)
    asked = []
    monkeypatch.setattr(type(tok), "__len__", lambda self: asked.append(1) or 1024)
    import httpx2

    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app),
                                  base_url="http://gateway",
                                  headers={"Authorization": "Bearer k"}) as http:
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "2 + 3 = ?"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("hi")
        assert asked == []
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": [5, 2000]})
        assert_openai_error(r, 400, param="prompt", says="e.g. 2000")
        assert asked == [1]
    await gw.close()
