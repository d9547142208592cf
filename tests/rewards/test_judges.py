"""Judges score episodes through a scripted client: parsed scores, cache hits, counted failures,
timeouts, retries, the concurrency limit, and the failed-episode path."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from areal_agents.episode import Episode
from areal_agents.errors import ConfigError
from areal_agents.rewards import GroupJudge, JudgeFailed, ReferenceJudge, RubricJudge
from areal_agents.testing.envs import GenericTestEnv
from areal_agents.testing.openai_mock import OpenAIMock
from areal_agents.trainers.episodes import EpisodeFailed, play


def episode(answer: str, task: str = "2 + 3 = ?", info: dict | None = None) -> Episode:
    return Episode(["agent"], {"agent": [{"role": "user", "content": task},
                                         {"role": "assistant", "content": answer}]},
                   {"agent": [0.0]}, {"agent": 0.0}, 1, "terminated",
                   infos={"agent": info or {}})


class SlowClient:
    """An ``AsyncOpenAI`` stand-in whose chat completions take ``delay`` seconds and report
    their usage; records the most requests in flight at once."""

    def __init__(self, delay: float, reply: str = "Score: 5") -> None:
        self.delay, self.reply = delay, reply
        self.in_flight = self.max_in_flight = self.calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, **kwargs):
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        message = SimpleNamespace(content=self.reply)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)],
                               usage=SimpleNamespace(prompt_tokens=10, completion_tokens=2))


async def test_rubric_score_is_parsed_normalised_and_cached():
    mock = OpenAIMock(["Score: 7/10"])
    judge = RubricJudge("Is the sum right?", client=mock.async_client(), name="rubric")
    assert await judge(episode("5")) == {"agent": 0.7}
    assert await judge(episode("5")) == {"agent": 0.7}  # same prompt: from the cache
    assert await judge(episode("6")) == {"agent": 0.7}
    assert len(mock.requests) == 2
    prompt = mock.requests[0]["messages"][0]["content"]
    assert "Is the sum right?" in prompt and "2 + 3 = ?" in prompt and "Answer:\n5" in prompt
    assert mock.requests[0]["temperature"] == 0.0  # judges are greedy by default
    m = judge.take_metrics()
    assert (m["judge/rubric/calls"], m["judge/rubric/cache_hits"]) == (2.0, 1.0)
    assert m["judge/rubric/tokens"] == 4.0  # the mock reports 1 + 1 tokens per call
    assert m["judge/rubric/mean_score"] == pytest.approx(0.7)
    assert judge.take_metrics()["judge/rubric/calls"] == 0.0  # counts since the last take


async def test_unreadable_reply_fails_the_episode_with_its_cause_and_is_counted():
    judge = RubricJudge("r", client=OpenAIMock(["I like it"]).async_client(), name="j")
    with pytest.raises(JudgeFailed, match="no score found") as info:
        await judge(episode("5"))
    assert info.value.cause == "parse"
    m = judge.take_metrics()
    assert (m["judge/j/parse_failures"], m["judge/j/failed_episodes"]) == (1.0, 1.0)
    assert "judge/j/mean_score" not in m  # no score was given, not even 0


async def test_fallback_policy_rewards_the_fallback_and_counts_it():
    judge = RubricJudge("r", client=OpenAIMock(["Score: 12"]).async_client(), name="j",
                        on_failure="fallback", fallback=0.25)
    assert await judge(episode("5")) == {"agent": 0.25}
    m = judge.take_metrics()
    assert (m["judge/j/out_of_range"], m["judge/j/fallbacks"], m["judge/j/failed_episodes"]) == (
        1.0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="needs fallback="):
        RubricJudge("r", client=OpenAIMock(["x"]).async_client(), on_failure="fallback")


async def test_timeouts_are_retried_then_fail_the_episode():
    client = SlowClient(delay=5.0)
    judge = RubricJudge("r", client=client, name="slow", timeout_s=0.05, retries=1, backoff_s=0)
    with pytest.raises(JudgeFailed, match=r"failed 2 attempts \(last: timed out after 0.05 s\)") \
            as info:
        await judge(episode("5"))
    assert info.value.cause == "timeout" and client.calls == 2
    m = judge.take_metrics()
    assert (m["judge/slow/timeouts"], m["judge/slow/failed_episodes"]) == (2.0, 1.0)


async def test_a_server_error_is_retried_and_the_retry_scores():
    mock = OpenAIMock([500, "Score: 5"])
    judge = RubricJudge("r", client=mock.async_client(), name="j", backoff_s=0)
    assert await judge(episode("5")) == {"agent": 0.5}
    m = judge.take_metrics()
    assert (m["judge/j/calls"], m["judge/j/errors"], len(mock.requests)) == (1.0, 1.0, 2)


async def test_concurrency_limit_holds():
    client = SlowClient(delay=0.02)
    judge = RubricJudge("r", client=client, max_concurrency=2, cache=0)
    rewards = await asyncio.gather(*(judge(episode(str(i))) for i in range(6)))
    assert rewards == [{"agent": 0.5}] * 6
    assert client.calls == 6 and client.max_in_flight == 2
    assert judge.take_metrics()[f"judge/{judge.name}/tokens"] == 72.0


async def test_reference_judge_compares_with_the_envs_gold_answer():
    mock = OpenAIMock(lambda body: "correct" if "Given answer:\n5" in
                      body["messages"][0]["content"] else "Verdict: incorrect")
    judge = ReferenceJudge(client=mock.async_client())
    assert await judge(episode("Answer: 5", info={"answer": 5})) == {"agent": 0.0}
    assert await judge(episode("5", info={"answer": 5})) == {"agent": 1.0}
    assert "Reference answer:\n5" in mock.requests[0]["messages"][0]["content"]
    with pytest.raises(KeyError, match=r"has no 'answer' \(keys: \['reason'\]\)"):
        await judge(episode("5", info={"reason": "x"}))


async def test_group_judge_scores_every_member_in_one_call():
    def reply(body):  # scores each candidate by the number it answered
        text = body["messages"][0]["content"]
        return "\n".join(f"{i}: {text.split(f'Candidate {i}:')[1].split()[0]}" for i in (1, 2, 3))

    mock = OpenAIMock(reply)
    judge = GroupJudge("best sum", client=mock.async_client(), scale=(0, 10))
    rewards = await judge([episode("5"), episode("9"), episode("0")])
    assert rewards == [{"agent": 0.5}, {"agent": 0.9}, {"agent": 0.0}]
    assert len(mock.requests) == 1


def test_a_judge_needs_exactly_one_model_source():
    with pytest.raises(ConfigError, match="exactly one of policy="):
        RubricJudge("r")
    with pytest.raises(ConfigError, match="exactly one of policy="):
        RubricJudge("r", policy="judge", client=object())


async def test_play_fails_the_episode_when_the_judge_keeps_failing():
    judge = RubricJudge("r", client=OpenAIMock([503]).async_client(), retries=1, backoff_s=0,
                        name="j")
    env = GenericTestEnv(episode_length=1)

    async def no_seat(*args):
        raise AssertionError("no LLM seat in this test")

    from areal_agents.agents import ScriptedAgent

    with pytest.raises(EpisodeFailed, match="failed in a reward function: JudgeFailed: judge "
                       "model 'default' failed 2 attempts") as info:
        await play(env, 3, policy_of={"agent": "p"}, fixed_agents={
            "agent": ScriptedAgent(lambda o: "x")}, open_seat=no_seat, reward_fns=[judge])
    assert isinstance(info.value.__cause__, JudgeFailed)
    assert judge.take_metrics()["judge/j/failed_episodes"] == 1.0
