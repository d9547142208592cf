"""The outcome ledger adds up across a resume: every submitted episode is trained, filtered,
failed or ``cancelled_by_restart`` (in flight or buffered when the checkpoint was written),
or is still unresolved now."""

from __future__ import annotations

import asyncio
import json

from areal_agents.agents import ScriptedAgent
from areal_agents.rollout import RolloutController, StalenessControl
from areal_agents.samples import Sample
from areal_agents.testing.sim import run_virtual
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

POLICIES = ("p", "q")


def _controller() -> RolloutController:
    async def episode(seed: int, member: int) -> dict[str, list[Sample]]:
        versions = {p: ctl.controls[p].version for p in POLICIES}
        await asyncio.sleep(1.0 + (seed * 7 + member * 3) % 5)  # a long tail: groups end late
        if (seed, member) == (3, 1):
            raise RuntimeError("env crashed")
        return {p: [Sample([1, 2], [0, 1], [0.0, -0.5], [-1, versions[p]], reward=float(member),
                           policy=p)] for p in POLICIES}

    controls = {p: StalenessControl(4, max_staleness=1, max_concurrent=6) for p in POLICIES}
    ctl = RolloutController(episode, controls, group_size=2)
    return ctl


def _unsettled(ctl: RolloutController, policy: str) -> int:
    """Episodes without an outcome yet: generating, waiting for their group, or buffered."""
    c = ctl.controls[policy]
    return c.running + c.waiting + ctl.buffered(policy)


def _check_identity(ctl: RolloutController) -> None:
    for p in POLICIES:
        submitted, ledger = ctl.controls[p].submitted, ctl.ledger[p]
        assert submitted == sum(ledger.values()) + _unsettled(ctl, p), (p, submitted, ledger)


async def _train(ctl: RolloutController, steps: int) -> None:
    for _ in range(steps):
        for p in POLICIES:
            await ctl.take(p, 4)
            version = ctl.controls[p].version + 1
            await ctl.update_weights(p, lambda: asyncio.sleep(0.5), version)


def test_episodes_in_flight_at_the_checkpoint_are_cancelled_by_restart():
    async def first_run():
        runner = asyncio.create_task(ctl.run())
        await _train(ctl, 2)
        await asyncio.sleep(0.5)  # the checkpoint is written while episodes generate
        state = json.loads(json.dumps(ctl.state_dict()))
        in_flight = {p: _unsettled(ctl, p) for p in POLICIES}
        _check_identity(ctl)
        runner.cancel()  # SIGKILL: nothing else is recorded
        return state, in_flight

    async def resumed():
        runner = asyncio.create_task(ctl2.run())
        _check_identity(ctl2)  # right after loading: nothing in flight, nothing missing
        await _train(ctl2, 2)
        await asyncio.sleep(0.5)
        _check_identity(ctl2)
        await ctl2.stop()
        runner.cancel()

    ctl = _controller()
    state, in_flight = run_virtual(first_run())
    assert all(n > 0 for n in in_flight.values()), in_flight
    ctl2 = _controller()
    ctl2.load_state_dict(state)
    for p in POLICIES:
        assert ctl2.ledger[p]["cancelled_by_restart"] == in_flight[p] == state["unresolved"][p]
        assert ctl2.counts()[p]["outcome/cancelled_by_restart"] == in_flight[p]
    run_virtual(resumed())
    for p in POLICIES:
        assert ctl2.ledger[p]["trained"] >= 16 and ctl2.ledger[p]["failed"] >= 1
    _check_identity(ctl2)


def test_a_state_saved_before_unresolved_was_recorded_derives_it():
    state = {"cursor": 4, "done": [], "ledger": {"p": {"trained": 8, "failed": 1}},
             "controls": {"p": {"version": 2, "submitted": 12, "filtered": 0, "failed": 1}}}
    ctl = RolloutController(_controller().run_episode, {"p": StalenessControl(4, 1)},
                            group_size=2)
    ctl.load_state_dict(state)  # type: ignore[arg-type]
    assert ctl.ledger["p"] == {"trained": 8, "failed": 1, "cancelled_by_restart": 3}


def _trainer(run_dir, resume=False):
    return Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": Policy(lr=1e-3, sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"}, agents={"listener": ScriptedAgent(lambda o: "A")},
        batch_size=4, group_size=2, max_staleness=1, checkpoint_every=1, run_dir=run_dir,
        resume=resume, progress=False)


async def test_resumed_trainer_logs_a_ledger_that_adds_up(tmp_path):
    first = _trainer(tmp_path)
    try:
        await first.afit(2)  # with max_staleness=1, step 3's episodes are admitted by then
    finally:
        await first.aclose()
    saved = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    lost = saved["controller"]["unresolved"]["speaker"]
    assert lost > 0
    second = _trainer(tmp_path, resume=True)
    try:
        await second.afit(3)
    finally:
        await second.aclose()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    row = rows[-1]
    assert row["step"] == 3
    prefix = "outcomes/speaker/"
    outcomes = {k: v for k, v in row.items() if k.startswith(prefix + "outcome/")}
    assert outcomes[prefix + "outcome/cancelled_by_restart"] == lost
    unsettled = sum(row[prefix + k] for k in ("running", "waiting", "buffered"))
    assert row[prefix + "submitted"] == sum(outcomes.values()) + unsettled
