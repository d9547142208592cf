"""Engine replicas that die, restart, join late or fail a weight update.

The fast tests use fakes behind a real ``Gateway``; the slow one SIGKILLs an engine server
(a separate process) during a short ``Trainer`` run with two replicas.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import openai
import pytest
import torch

from areal_agents.engines.base import GenerateRequest, GenerateResult, WeightUpdate
from areal_agents.errors import EngineError, EngineUnavailable
from areal_agents.gateway import Gateway
from areal_agents.testing.engine import ScriptedEngine


class MortalEngine(ScriptedEngine):
    """A scripted engine that can die (every call then raises ``EngineUnavailable``) and,
    with ``restart_limit``, restart (the protocol ``Gateway`` uses for ``RemoteEngine``)."""

    def __init__(self, restart_limit: int = 0, fail_update: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.dead = False
        self.paused = False
        self.restart_limit = restart_limit
        self.num_restarts = 0
        self.fail_update = fail_update
        self.kept: list[int] = []  # versions handed over while dead

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineUnavailable("the engine server at fake is unreachable")

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self._check_alive()
        return await super().generate(request)

    async def pause(self) -> None:
        self._check_alive()
        self.paused = True
        await super().pause()

    async def resume(self) -> None:
        self._check_alive()
        self.paused = False
        await super().resume()

    async def update_weights(self, update: WeightUpdate) -> None:
        if self.dead and self.restart_limit:
            self.version = update.version if update.version is not None else self.version + 1
            self.kept.append(self.version)
            return
        self._check_alive()
        if self.fail_update:
            raise EngineError("update refused: unknown tensor 'x'")
        await super().update_weights(update)

    async def restart(self) -> None:
        self.num_restarts += 1
        self.dead = False


@pytest.fixture(scope="module")
def tok() -> Any:
    from areal_agents.models import tiny_tokenizer

    return tiny_tokenizer()


def test_router_skips_dead_replicas_and_reroutes_their_sessions():
    from areal_agents.gateway.router import Router

    router = Router([ScriptedEngine(), ScriptedEngine(), ScriptedEngine()])
    assert [router.pick(s) for s in ("a", "b", "c", "d")] == [0, 1, 2, 0]
    router.mark_dead(0)
    assert router.live_engines() == router.engines[1:]
    assert [router.pick(s) for s in ("a", "d", "b")] == [1, 2, 1]
    router.mark_dead(1)
    router.mark_dead(2)
    with pytest.raises(EngineUnavailable, match="all 3 engine replicas of this policy are dead"):
        router.pick("e")
    router.revive(1)
    assert router.pick("e") == 1
    late = ScriptedEngine()
    assert router.add(late) == 3 and router.pick(None) == 3  # idle and nothing pinned
    assert router.engines[3] is late and router.load(3) == 0


async def _chat(gw: Gateway, key: str) -> Any:
    client = gw.async_client(key)
    try:
        return await client.chat.completions.create(
            model="p", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        await client.close()


async def test_a_dead_replica_fails_its_request_then_is_routed_around(tok):
    engines = [MortalEngine(script=["ok"], tokenizer=tok) for _ in range(2)]
    gw = Gateway()
    gw.add_policy("p", engines, tok)
    key = await gw.create_session("p")
    await _chat(gw, key)
    assert len(engines[0].requests) == 1  # the session is pinned to replica 0
    engines[0].dead = True
    with pytest.raises(openai.APIStatusError) as info:  # its in-flight request fails
        await _chat(gw, key)
    assert info.value.status_code == 503 and "engine replica unavailable" in info.value.message
    assert gw.policies["p"].router.dead == {0}
    for _ in range(3):  # the same session and new ones go to replica 1 now
        await _chat(gw, key)
        await _chat(gw, await gw.create_session("p"))
    assert (len(engines[0].requests), len(engines[1].requests)) == (1, 6)
    await gw.push_weights("p", WeightUpdate(named_tensors=iter([])))  # skips the dead one
    assert [e.version for e in engines] == [0, 1]


async def test_when_every_replica_is_dead_requests_fail_with_503(tok):
    engine = MortalEngine(script=["ok"], tokenizer=tok)
    gw = Gateway()
    gw.add_policy("p", [engine], tok)
    engine.dead = True
    key = await gw.create_session("p")
    with pytest.raises(openai.APIStatusError):
        await _chat(gw, key)
    with pytest.raises(openai.APIStatusError) as info:
        await _chat(gw, key)
    assert info.value.status_code == 503
    assert "all 1 engine replicas of this policy are dead" in info.value.message


async def test_a_restartable_replica_keeps_updates_while_dead_and_is_revived(tok):
    engines = [MortalEngine(restart_limit=1, script=["ok"], tokenizer=tok),
               MortalEngine(script=["ok"], tokenizer=tok)]
    gw = Gateway()
    gw.add_policy("p", engines, tok)
    engines[0].dead = True
    restart = engines[0].restart

    async def slow_restart() -> None:  # an update arrives while the server restarts
        await asyncio.sleep(0.05)
        await restart()

    engines[0].restart = slow_restart  # type: ignore[method-assign]
    key = await gw.create_session("p")
    with pytest.raises(openai.APIStatusError):
        await _chat(gw, key)
    await gw.push_weights("p", WeightUpdate(named_tensors=iter([]), version=1))
    assert engines[0].kept == [1]
    for _ in range(100):
        if not gw.policies["p"].router.dead:
            break
        await asyncio.sleep(0.01)
    assert gw.policies["p"].router.dead == set() and engines[0].num_restarts == 1
    assert [e.version for e in engines] == [1, 1]
    engines[0].dead = True  # its one restart is used: dropped for good
    with pytest.raises(openai.APIStatusError):
        await _chat(gw, key)
    await asyncio.sleep(0.05)
    assert gw.policies["p"].router.dead == {0} and engines[0].num_restarts == 1


async def test_a_replica_revived_during_a_push_is_paused_with_the_others(tok):
    engines = [MortalEngine(restart_limit=1, script=["ok"], tokenizer=tok),
               MortalEngine(script=["ok"], tokenizer=tok)]
    gw = Gateway()
    gw.add_policy("p", engines, tok)
    router = gw.policies["p"].router
    engines[0].dead = True
    restart = engines[0].restart

    async def slow_restart() -> None:
        await asyncio.sleep(0.05)
        await restart()

    engines[0].restart = slow_restart  # type: ignore[method-assign]
    await gw.pause("p")  # a push begins; replica 0 is found dead and restarts meanwhile
    assert router.dead == {0} and engines[1].paused
    for _ in range(100):
        if not router.dead:
            break
        await asyncio.sleep(0.01)
    assert router.dead == set() and engines[0].paused  # not generating mid-push
    await gw.resume("p")
    assert [e.paused for e in engines] == [False, False]


async def test_a_failed_update_resumes_every_replica_and_raises(tok):
    """AReaL#1160: a weight update that fails must not leave the engines paused."""
    engines = [MortalEngine(script=["ok"], tokenizer=tok),
               MortalEngine(fail_update=True, script=["ok"], tokenizer=tok)]
    gw = Gateway()
    gw.add_policy("p", engines, tok)
    with pytest.raises(EngineError, match="update refused: unknown tensor 'x'"):
        await gw.push_weights("p", WeightUpdate(named_tensors=iter([]), version=1))
    assert [e.paused for e in engines] == [False, False]
    await _chat(gw, await gw.create_session("p"))  # still serving


async def test_a_late_replica_takes_the_current_weights_and_version_before_traffic(tok):
    from areal_agents.engines.local import LocalEngine
    from areal_agents.models import tiny

    torch.set_num_threads(1)
    model, _ = tiny("xs", seed=0)
    trained, _ = tiny("xs", seed=1)
    gw = Gateway()
    gw.add_policy("p", [LocalEngine(model, tok)], tok)
    for version in (1, 2):
        await gw.push_weights("p", WeightUpdate(named_tensors=iter(list(
            trained.state_dict().items())), version=version))
    late_model, _ = tiny("xs", seed=0)
    late = LocalEngine(late_model, tok)
    with pytest.raises(ValueError, match=r"the new replica of 'p' holds version 0, the policy "
                                         r"is at 2: pass weights="):
        await gw.add_replica("p", late)
    assert len(gw.policies["p"].router.engines) == 1
    index = await gw.add_replica("p", late, WeightUpdate(named_tensors=iter(list(
        trained.state_dict().items()))))
    assert index == 1 and late.version == 2
    assert torch.equal(late.model.model.layers[0].mlp.up_proj.weight,
                       trained.model.layers[0].mlp.up_proj.weight)
    await gw.close()


# ---- a real engine server killed during a Trainer run -------------------------------------


def _kill_when_busy(trainer: Any, policy: str) -> asyncio.Task[int]:
    """SIGKILL the process group of ``policy``'s replica 0 once it has requests in flight."""

    async def watch() -> int:
        engine = trainer.gateway.policies[policy].router.engines[0]
        while engine.num_pending == 0:
            await asyncio.sleep(0.005)
        os.killpg(engine.server.pid, signal.SIGKILL)
        return engine.server.pid

    return asyncio.ensure_future(watch())


@pytest.mark.slow
def test_killing_an_engine_server_mid_run_the_run_continues_and_the_ledger_adds_up(
        tmp_path, caplog):
    """Two listener servers, one SIGKILLed while busy: its in-flight requests answer 503 with
    the cause and are retried on the other (``SessionAgent`` retries 5xx on both APIs), so no
    episode fails, the run goes on, the ledger adds up; restarted (restart_limit=1), the
    killed one comes back on the current version and takes traffic again."""
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    server = {"kind": "server", "replicas": 2,
              "server_args": {"max_batch_size": 8, "restart_limit": 1}}
    policies = {
        "speaker": Policy(model="tiny:xs", seed=0, lr=1e-3, api="completions",
                          sampling={"temperature": 1.0, "max_tokens": 1}),
        "listener": Policy(model="tiny:xs", seed=1, lr=1e-3, api="completions",
                           sampling={"temperature": 1.0, "max_tokens": 1}, inference=server),
    }
    trainer = Trainer(env="Signaling-v0", env_kwargs={"num_items": 4, "vocab_size": 10},
                      policies=policies, policy_map={"speaker": "speaker",
                                                     "listener": "listener"},
                      batch_size=8, group_size=4, max_staleness=1, run_dir=tmp_path,
                      progress=False, seed=0)
    served_after: list[int] = []

    async def run() -> tuple[list[dict[str, float]], int, dict[str, dict[str, int]]]:
        await trainer.setup()
        router = trainer.gateway.policies["listener"].router
        killer = _kill_when_busy(trainer, "listener")
        try:
            history = await trainer.afit(4)
            killed = await killer
            counts = trainer.controller.counts()
            while router.dead:  # the restart runs in the background (one server start)
                await asyncio.sleep(0.2)
            generate = router.engines[0].generate

            async def counted(request: GenerateRequest) -> GenerateResult:
                served_after.append(router.engines[0].version)
                return await generate(request)

            router.engines[0].generate = counted
            await trainer.afit(6)
            return history, killed, counts
        finally:
            killer.cancel()
            await trainer.aclose()  # stops the servers (in this loop: their clients live here)

    history, killed, counts = asyncio.run(run())
    assert trainer.step == 4 + 2 and len(history) == 6
    for policy in ("speaker", "listener"):
        c = counts[policy]  # after the first 4 steps
        outcomes = sum(v for k, v in c.items() if k.startswith("outcome/"))
        assert c["submitted"] == outcomes + c["running"] + c["waiting"] + c["buffered"]
        # each step takes whole groups until >= 8 episodes; a group that lost members on the
        # killed server holds < 4, so a step may train up to 8 + 3 episodes
        assert 4 * 8 <= c["outcome/trained"] <= 4 * (8 + 3)
        assert c.get("outcome/failed", 0) == 0  # retried on the live replica, not failed
    assert not trainer.controller.errors
    retried = [r.getMessage() for r in caplog.records
               if r.name == "areal_agents.trainers.llm_session" and "Retrying" in r.getMessage()]
    assert retried and all("engine replica unavailable" in m for m in retried)
    assert any(f"The server process is exited (-{signal.SIGKILL.value})" in m for m in retried)
    router = trainer.gateway.policies["listener"].router
    restarted = router.engines[0]
    assert restarted.num_restarts == 1 and restarted.server.pid != killed
    assert [e.version for e in router.engines] == [6, 6]
    assert served_after and min(served_after) >= 4  # it takes traffic, on current versions
    assert not any(e.server.running for e in router.engines)
