"""``trainers.serving.build_engines``: what each placement builds, and the errors naming fixes
(no server process is started here: attaching uses an engine app on a uvicorn thread)."""

from __future__ import annotations

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.engines.service import TOKEN_ENV, build_app
from areal_agents.errors import ConfigError
from areal_agents.gateway.server import ServerThread
from areal_agents.models import tiny
from areal_agents.trainers.placement import InferencePlacement
from areal_agents.trainers.serving import build_engines


@pytest.fixture(scope="module")
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


async def test_in_process_serves_the_model_object_itself(model_tok):
    model, tok = model_tok
    engines = await build_engines("p", InferencePlacement(), model, tok, None, max_batch_size=3)
    assert len(engines) == 1 and isinstance(engines[0], LocalEngine)
    assert engines[0].model is model and engines[0].max_batch_size == 3


@pytest.mark.parametrize(("placement", "message"), [
    (InferencePlacement(kind="server", server_args={"thread": 2}),
     "Policy.inference.server_args: unknown ['thread']; a server placement takes ['threads', "
     "'max_batch_size', 'restart_limit', 'startup_timeout_s', 'timeout_s'] (and 'token' with "
     "urls)"),
    (InferencePlacement(kind="server", transport="gloo", device="cuda"),
     "Policy.inference: kind='server' engines run on the CPU (the engine server has no device "
     "option yet); use kind='in_process' or 'vllm' for device='cuda', or omit device"),
    (InferencePlacement(kind="sglang"),
     "Policy.inference: kind='sglang' launches SGLang servers and needs python (the "
     "interpreter of a venv with SGLang) or $AREAL_AGENTS_SGLANG_PYTHON; see "
     "docs/inference_servers.md"),
    (InferencePlacement(kind="server", urls=("http://127.0.0.1:9",)),
     f"Policy.inference.urls: the servers' token is needed; set server_args.token or "
     f"${TOKEN_ENV}"),
])
async def test_unservable_placements_name_the_fix(model_tok, placement, message, monkeypatch,
                                                  tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("AREAL_AGENTS_SGLANG_PYTHON", raising=False)
    model, tok = model_tok
    with pytest.raises(ConfigError) as info:
        await build_engines("p", placement, model, tok, tmp_path)
    assert str(info.value) == message
    assert not (tmp_path / "serving").exists()  # refused before saving anything


async def test_urls_attach_to_running_servers_with_their_token(model_tok):
    model, tok = model_tok
    local = LocalEngine(model, tok)
    with ServerThread(build_app(local, "secret")) as a, ServerThread(
            build_app(local, "secret")) as b:
        placement = InferencePlacement(kind="server", urls=(a.url, b.url), transport="disk",
                                       server_args={"token": "secret", "timeout_s": 30})
        engines = await build_engines("p", placement, model, tok, None)
        try:
            assert [type(e) for e in engines] == [RemoteEngine, RemoteEngine]
            assert [e.url for e in engines] == [a.url, b.url]
            assert all(e.transport == "disk" and e.timeout_s == 30 for e in engines)
            out = await engines[1].generate(GenerateRequest([1, 2, 3], SamplingParams(
                max_tokens=3, temperature=0)))
            assert len(out.outputs[0].token_ids) == 3
        finally:
            for engine in engines:
                await engine.close()


async def test_a_temporary_serving_dir_is_removed_with_the_last_replica(model_tok, monkeypatch,
                                                                       tmp_path):
    """Without a run_dir the model is saved under a temporary ``serving-*`` root, which goes
    when the last replica closes (it used to stay in /tmp for good)."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    launched = []

    async def launch(cls, model_dir, **kwargs):
        assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
        engine = RemoteEngine("http://127.0.0.1:9", token="t", max_context=64)
        launched.append(model_dir)
        return engine

    monkeypatch.setattr(RemoteEngine, "launch", classmethod(launch))
    model, tok = model_tok
    engines = await build_engines("p", InferencePlacement(kind="server", replicas=2), model,
                                  tok, None)
    roots = list(tmp_path.glob("serving-*"))
    assert len(roots) == 1 and launched == [roots[0] / "serving" / "p"] * 2
    await engines[0].close()
    assert roots[0].exists()  # the other replica may still restart from it
    await engines[1].close()
    assert not roots[0].exists()


async def test_a_failed_launch_removes_the_temporary_serving_dir(model_tok, monkeypatch,
                                                                 tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def launch(cls, model_dir, **kwargs):
        raise RuntimeError("no server")

    monkeypatch.setattr(RemoteEngine, "launch", classmethod(launch))
    model, tok = model_tok
    with pytest.raises(RuntimeError, match="no server"):
        await build_engines("p", InferencePlacement(kind="server"), model, tok, None)
    assert not list(tmp_path.glob("serving-*"))
