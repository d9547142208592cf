"""``trainer.warm_start.shares``: how a warm start that fits several agents' demos (the shared
base of adapter policies, a policy playing several seats) mixes them in each batch."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.samples import Sample
from areal_agents.trainers import warm_start as ws
from areal_agents.trainers.warm_start import (
    MixStage,
    mixed_schedule,
    parse_shares,
    sft,
    warm_start_plan,
)

from .test_warm_start import RecordingEngine


def tagged(first: int, n: int) -> list[Sample]:
    """``n`` samples whose first token ids are ``first, first + 1, ...`` (who is who)."""
    return [Sample([first + i, 1, 2], [0, 1, 1], [0.0] * 3, [-1] * 3) for i in range(n)]


def counts(batches: list[list[int]], cut: int = 1000) -> list[tuple[int, int]]:
    """Per batch: (rows below ``cut``, rows at or above it)."""
    return [(sum(r < cut for r in b), sum(r >= cut for r in b)) for b in batches]


def test_parse_shares_forms_and_errors():
    assert parse_shares(None) is None
    assert parse_shares({"speaker": 3, "listener": 1}, ["speaker", "listener"]) == [
        MixStage(None, {"speaker": 3.0, "listener": 1.0})]
    assert parse_shares([{"steps": 150, "shares": {"speaker": 1, "listener": 1}},
                         {"shares": {"speaker": 1}}]) == [
        MixStage(150, {"speaker": 1.0, "listener": 1.0}), MixStage(None, {"speaker": 1.0})]
    bad = [({"speaker": -1}, "share -1"), ({"speaker": 0, "listener": 0}, "no agent a share"),
           ({"speaker": "x"}, "share 'x'"), ([], "takes"), ("speaker", "takes"),
           ([{"shares": {"speaker": 1}}, {"steps": 2, "shares": {"speaker": 1}}], "needs steps"),
           ([{"steps": 0, "shares": {"speaker": 1}}], "steps=0"),
           ([{"steps": 5, "weights": {"speaker": 1}}], "stage 0 is"),
           ({"speaker": 1, "judge": 1}, r"agents \['judge'\] that have no demo player")]
    for spec, match in bad:
        with pytest.raises(aa.ConfigError, match=match):
            parse_shares(spec, ["speaker", "listener"])


def test_each_batch_holds_the_agents_demos_in_their_shares():
    groups = {"speaker": tagged(0, 40), "listener": tagged(1000, 50)}
    out = mixed_schedule(groups, parse_shares({"speaker": 3, "listener": 1}), 4, 32, seed=0)
    assert counts([[s.token_ids[0] for s in out[i:i + 32]] for i in range(0, 128, 32)]) == [
        (24, 8)] * 4
    # 1/3 of 32 is not whole: rounded per step, the remainder carried (exact over 3 steps)
    out = mixed_schedule(groups, parse_shares({"speaker": 2, "listener": 1}), 6, 32, seed=0)
    per_step = counts([[s.token_ids[0] for s in out[i:i + 32]] for i in range(0, 192, 32)])
    assert per_step == [(21, 11), (22, 10), (21, 11)] * 2
    assert sum(n for _, n in per_step[:3]) == 32  # 3 x 32 / 3
    # each agent's demos in its own passes: every one seen once before any repeats
    speaker = [s.token_ids[0] for s in out if s.token_ids[0] < 1000]
    assert sorted(speaker[:40]) == list(range(40)) and sorted(speaker[40:80]) == list(range(40))
    assert mixed_schedule(groups, parse_shares({"speaker": 2, "listener": 1}), 6, 32, 0) == out
    assert mixed_schedule(groups, parse_shares({"speaker": 2, "listener": 1}), 6, 32, 1) != out


def test_stages_change_the_mix_and_the_last_runs_to_the_end():
    groups = {"speaker": tagged(0, 40), "listener": tagged(1000, 50)}
    stages = parse_shares([{"steps": 2, "shares": {"speaker": 1, "listener": 1}},
                           {"shares": {"speaker": 1}}])
    engine = RecordingEngine()
    samples = groups["speaker"] + groups["listener"]
    losses = sft(engine, samples, steps=5, batch_size=8, mix=(groups, stages))
    assert len(losses) == 5
    assert counts(engine.batches) == [(4, 4), (4, 4), (8, 0), (8, 0), (8, 0)]
    with pytest.raises(ValueError, match="no demonstrations"):
        mixed_schedule({"speaker": tagged(0, 4), "listener": []},
                       parse_shares({"listener": 1}), 2, 4)
    with pytest.raises(ValueError, match="gives none of the agents"):
        mixed_schedule(groups, [MixStage(None, {"judge": 1.0})], 2, 4)


class Tokenizer:
    """Whitespace 'tokenizer' over the transcripts' digits: ``"7"`` -> ``[7]``."""

    eos_token, pad_token_id = "<eos>", 0

    def convert_tokens_to_ids(self, token):
        return 99

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split() if t.isdigit()]}


def transcripts(first: int, n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": str(first + i)},
             {"role": "assistant", "content": "5"}] for i in range(n)]


def rows_of(plan) -> list[list[int]]:
    engine = RecordingEngine()
    plan.run(engine)
    return engine.batches


def test_a_plan_without_shares_is_todays_bit_for_bit(monkeypatch):
    monkeypatch.setattr("areal_agents.trainers.llm_session.raw_prompt",
                        lambda messages: " ".join(m["content"] for m in messages))
    policy = aa.Policy(model="tiny:xs", sft_steps=6, api="completions")
    tok, by_agent = Tokenizer(), {"speaker": transcripts(10, 9), "listener": transcripts(40, 7)}
    flat = [t for ts in by_agent.values() for t in ts]
    plain = warm_start_plan(policy, tok, flat, seed=3)
    assert plain.mix is None and len(plain.samples) == 16
    expected = rows_of(plain)
    assert rows_of(warm_start_plan(policy, tok, by_agent, seed=3)) == expected
    # shares naming none of the plan's agents, or a plan of one agent: the plain plan
    assert warm_start_plan(policy, tok, by_agent, 3, parse_shares({"judge": 1})).mix is None
    one = warm_start_plan(policy, tok, {"speaker": by_agent["speaker"]}, 3,
                          parse_shares({"speaker": 3, "listener": 1}))
    assert one.mix is None
    mixed = warm_start_plan(policy, tok, by_agent, 3, parse_shares({"speaker": 3, "listener": 1}))
    assert mixed.mix is not None and mixed.samples == plain.samples
    assert counts(rows_of(mixed), cut=40) == [(12, 4)] * 6  # 16 samples: batches of 16


async def test_the_shared_base_warm_start_follows_the_shares(monkeypatch):
    """The trainer's shared warm start of adapter policies: by default the agents' demos
    concatenated and drawn alike (as before the option); with shares, 3:1 in every batch."""
    from lora.test_trainer_adapters import make

    calls = []
    original = ws.sft

    def recording_sft(engine, samples, steps, batch_size, seed, pad, target, mix=None):
        calls.append((samples, steps, batch_size, seed, mix))
        return original(engine, samples, steps, batch_size, seed, pad, target, mix)

    monkeypatch.setattr(ws, "sft", recording_sft)
    tokenizer = aa.Policy(model="tiny:xs").load()[1]
    target = tokenizer.encode("target", add_special_tokens=False)

    def is_speaker(sample: Sample) -> bool:
        ids = sample.token_ids
        return any(ids[i:i + len(target)] == target for i in range(len(ids)))

    players = {"speaker": "random", "listener": "random"}
    for shares in (None, {"speaker": 3, "listener": 1}):
        warm = {"episodes": 16, "players": players, **({"shares": shares} if shares else {})}
        trainer = make("fsdp", warm_start=warm)
        trainer.policies["base"].sft_steps = 3
        try:
            await trainer.setup()
        finally:
            await trainer.aclose()
        samples, steps, k, seed, mix = calls.pop()
        assert (len(samples), steps, k) == (32, 3, 32)
        # the speaker's demos, then the listener's: the list the warm start always fitted
        assert [is_speaker(s) for s in samples] == [True] * 16 + [False] * 16
        if shares is None:
            assert mix is None
            continue
        groups, stages = mix
        assert list(groups) == ["speaker", "listener"] and stages == parse_shares(shares)
        assert [s for g in groups.values() for s in g] == samples
        schedule = mixed_schedule(groups, stages, steps, k, seed)
        assert [sum(map(is_speaker, schedule[i:i + k])) for i in range(0, 3 * k, k)] == [24] * 3
    assert not calls


async def test_shares_naming_an_agent_without_demos_is_a_config_error():
    from lora.test_trainer_adapters import make

    trainer = make("fsdp", warm_start={"episodes": 2, "players": {"speaker": "random",
                                                                   "listener": "random"},
                                       "shares": {"speaker": 1, "judge": 1}})
    try:
        with pytest.raises(aa.ConfigError, match=r"agents \['judge'\] that have no demo player"):
            await trainer.setup()
    finally:
        await trainer.aclose()


def test_shares_from_yaml_and_the_example_leaves_them_off():
    """YAML (``--set`` / ``areal-agents train ... trainer.warm_start.shares=...``) gives the
    same stages as Python. The LoRA example keeps the 1:1 shared warm start: round 10's 2:1
    and 3:1 won at seeds 0 and 5 but not over seeds 0-5 (docs/multi_agent_training.md)."""
    from pathlib import Path

    from areal_agents.config import load_config

    path = Path(__file__).parents[2] / "examples/signaling/lora_per_role.yaml"
    example = load_config(path, []).build()
    assert "shares" not in example.warm_start
    players = list(example.warm_start["players"])
    trainer = load_config(path, ["trainer.warm_start.shares={speaker: 3, listener: 1}"]).build()
    assert parse_shares(trainer.warm_start["shares"], players) == [
        MixStage(None, {"speaker": 3.0, "listener": 1.0})]
    staged = load_config(path, ["trainer.warm_start.shares=[{steps: 150, shares: {speaker: 1, "
                                "listener: 1}}, {shares: {speaker: 1}}]"]).build()
    assert parse_shares(staged.warm_start["shares"], players) == [
        MixStage(150, {"speaker": 1.0, "listener": 1.0}), MixStage(None, {"speaker": 1.0})]
