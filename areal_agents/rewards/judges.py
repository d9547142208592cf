"""LLM judges as reward functions: pointwise rubric, reference-guided, group-relative.

``RubricJudge`` and ``ReferenceJudge`` are ``reward_fns`` entries (``judge(episode) ->
{agent: reward}``); ``GroupJudge`` is a ``group_reward_fns`` entry (``judge(episodes) ->
[{agent: reward} per episode]``, one model call for a whole GRPO group). The model is a policy
of the run (``policy="judge"``: the Trainer serves it, frozen, and binds its client) or any
``openai.AsyncOpenAI`` (``client=``, e.g. a vLLM server); see ``JudgeClient`` for the cache,
concurrency limit, timeouts and retries.

Failure accounting: a reply without a readable score (``parse_failures``) or with one off the
scale (``out_of_range``) is counted and then handled by ``on_failure``: ``"fail"`` (default)
raises ``JudgeFailed`` so the trainer counts the episode failed with the cause, ``"fallback"``
rewards ``fallback`` instead (counted as ``fallbacks``). A model that keeps failing (timeouts,
errors after the retries) always fails the episode. Nothing is ever scored 0 silently.

Example:
    >>> import asyncio
    >>> from areal_agents.episode import Episode
    >>> from areal_agents.testing.openai_mock import OpenAIMock
    >>> judge = RubricJudge("Rate the answer 0-10.", client=OpenAIMock(["Score: 7"]).async_client())
    >>> episode = Episode(["agent"], {"agent": [{"role": "user", "content": "2+2?"},
    ...     {"role": "assistant", "content": "4"}]}, {}, {"agent": 0.0}, 1, "terminated")
    >>> asyncio.run(judge(episode))
    {'agent': 0.7}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from areal_agents.episode import Episode
from areal_agents.errors import ConfigError

from .judge_cache import JudgeCache
from .judge_client import JudgeClient, JudgeFailed
from .parsing import JudgeParseError, OutOfRange, parse_score, parse_scores, parse_verdict

__all__ = ["GroupJudge", "Judge", "ReferenceJudge", "RubricJudge", "answer_of", "task_of"]

RUBRIC_TEMPLATE = ("{rubric}\n\nTask:\n{task}\n\nAnswer:\n{answer}\n\n"
                   "Reply with 'Score: <{low:g}-{high:g}>'.")
REFERENCE_TEMPLATE = ("Task:\n{task}\n\nReference answer:\n{reference}\n\nGiven answer:\n{answer}"
                      "\n\nDoes the given answer agree with the reference? Reply 'correct' or "
                      "'incorrect'.")
GROUP_TEMPLATE = ("{rubric}\n\nTask:\n{task}\n\n{candidates}\n\nScore every candidate on "
                  "{low:g}-{high:g}, relative to the others, one line each: '<number>: <score>'.")


def task_of(episode: Episode, agent: str) -> str:
    """The agent's first observation (the task): its transcript's first non-assistant message."""
    for m in episode.messages.get(agent, []):
        if m.get("role") != "assistant":
            return str(m.get("content") or "")
    return ""


def answer_of(episode: Episode, agent: str) -> str:
    """The agent's final answer: its last assistant message ("" when it never acted)."""
    for m in reversed(episode.messages.get(agent, [])):
        if m.get("role") == "assistant":
            return str(m.get("content") or "")
    return ""


class Judge:
    """What every judge shares: its model client, counters, and the failure policy.

    Args:
        policy, client, model, api, sampling, max_concurrency, timeout_s, retries,
            backoff_s, cache: how the judge model is reached (``JudgeClient``).
        agent: the agent whose answer is judged and rewarded (default: the episode's only
            agent; required for multi-agent envs).
        name: the judge's id in metrics (``judge/<name>/...``) and in the cache key.
        on_failure: ``"fail"`` (the episode fails with the cause) or ``"fallback"`` (reward
            ``fallback``) for unreadable or out-of-scale replies.
        fallback: the reward used by ``on_failure="fallback"``.

    Raises:
        ConfigError: ``on_failure="fallback"`` without ``fallback``, or an unknown policy.
    """

    def __init__(self, *, policy: str | None = None, client: Any = None, model: str | None = None,
                 api: Literal["chat", "completions"] = "chat",
                 sampling: dict[str, Any] | None = None, max_concurrency: int = 8,
                 timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 0.5,
                 cache: JudgeCache | int = 4096, agent: str | None = None,
                 name: str | None = None, on_failure: Literal["fail", "fallback"] = "fail",
                 fallback: float | None = None) -> None:
        if on_failure not in ("fail", "fallback"):
            raise ConfigError(f"judge on_failure={on_failure!r}; choose 'fail' or 'fallback'")
        if on_failure == "fallback" and fallback is None:
            raise ConfigError("judge on_failure='fallback' needs fallback=<reward>")
        self.backend = JudgeClient(policy=policy, client=client, model=model, api=api,
                                   sampling=sampling, max_concurrency=max_concurrency,
                                   timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                   cache=cache)
        self.agent = agent
        self.name = name or f"{type(self).__name__.lower()}-{self.backend.model}"
        self.on_failure, self.fallback = on_failure, fallback
        self.counts: Counter[str] = Counter()  # parse_failures, failed_episodes, scores...
        self._score_sum = self._taken_score_sum = 0.0
        self._taken: Counter[str] = Counter()

    @property
    def policy(self) -> str | None:
        """The run's policy this judge calls (the Trainer serves and binds it), or None."""
        return self.backend.policy

    def bind(self, client: Any, model: str | None = None) -> None:
        """Use the Trainer's client for ``policy`` (and ``model`` as the request's model)."""
        self.backend.bind(client, model)

    def _agent(self, episode: Episode) -> str:
        if self.agent is not None:
            return self.agent
        if len(episode.agents) != 1:
            raise ConfigError(f"{self.name}: the episode has agents {episode.agents}; pass "
                              "agent=<the agent whose answer is judged>")
        return episode.agents[0]

    async def _ask(self, prompt: str, episodes: int = 1) -> str:
        try:
            return await self.backend.complete(self.name, prompt)
        except JudgeFailed:
            self.counts["failed_episodes"] += episodes
            raise

    def _unreadable(self, error: JudgeParseError, episodes: int = 1) -> float:
        """Count an unreadable or out-of-scale reply; the fallback, or raise ``JudgeFailed``."""
        cause = "out_of_range" if isinstance(error, OutOfRange) else "parse"
        self.counts["out_of_range" if cause == "out_of_range" else "parse_failures"] += 1
        if self.on_failure == "fallback":
            self.counts["fallbacks"] += episodes
            assert self.fallback is not None
            return self.fallback
        self.counts["failed_episodes"] += episodes
        raise JudgeFailed(f"{self.name}: {error}", cause) from error

    def _scored(self, value: float) -> float:
        self.counts["scores"] += 1
        self._score_sum += value
        return value

    def take_metrics(self) -> dict[str, float]:
        """``judge/<name>/<counter>`` since the previous call: calls, cache_hits,
        parse_failures, out_of_range, timeouts, errors, failed_episodes, fallbacks, tokens
        (prompt + completion), and ``mean_score`` of the rewards given."""
        now = Counter(self.counts) + Counter(self.backend.counts)
        now["tokens"] = now["prompt_tokens"] + now["completion_tokens"]
        delta = {k: now[k] - self._taken[k] for k in now}
        out = {f"judge/{self.name}/{k}": float(delta.get(k, 0)) for k in
               ("calls", "cache_hits", "parse_failures", "out_of_range", "timeouts", "errors",
                "failed_episodes", "fallbacks", "tokens")}
        if delta.get("scores"):
            out[f"judge/{self.name}/mean_score"] = ((self._score_sum - self._taken_score_sum)
                                                    / delta["scores"])
        self._taken, self._taken_score_sum = now, self._score_sum
        return out


class RubricJudge(Judge):
    """Pointwise: the model rates one answer against a rubric on ``scale``.

    The prompt is ``template`` filled with ``rubric``, ``task`` (the agent's first
    observation), ``answer`` (its last message), ``low`` and ``high``. The reply is read by
    ``parse_score`` ("Score: 7/10", "7", "**7**", ``{"score": 7}``); the reward is the score
    mapped to [0, 1] (``normalize``) or the raw score.

    Args:
        rubric: what a good answer is.
        scale: ``(low, high)`` of the score.
        normalize: reward ``(score - low) / (high - low)`` instead of the score.
        template: the prompt template (fields above).
        **kwargs: ``Judge``'s arguments (model, limits, failure policy).
    """

    def __init__(self, rubric: str, *, scale: tuple[float, float] = (0, 10),
                 normalize: bool = True, template: str = RUBRIC_TEMPLATE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not scale[0] < scale[1]:
            raise ConfigError(f"RubricJudge scale must be (low, high) with low < high, got {scale}")
        self.rubric, self.scale, self.normalize, self.template = rubric, scale, normalize, template

    def render(self, episode: Episode, agent: str) -> str:
        """The prompt the judge model sees for ``agent``'s answer."""
        low, high = self.scale
        return self.template.format(rubric=self.rubric, task=task_of(episode, agent),
                                    answer=answer_of(episode, agent), low=low, high=high)

    async def __call__(self, episode: Episode) -> dict[str, float]:
        agent = self._agent(episode)
        reply = await self._ask(self.render(episode, agent))
        low, high = self.scale
        try:
            score = parse_score(reply, low, high)
        except JudgeParseError as e:
            return {agent: self._unreadable(e)}
        return {agent: self._scored((score - low) / (high - low) if self.normalize else score)}


class ReferenceJudge(Judge):
    """Reference-guided: the model compares the answer with a gold answer; correct -> 1, else 0.

    The gold answer is ``episode.infos[agent][reference_key]`` (the env's last info, e.g.
    Arithmetic's ``"answer"``), or ``reference(episode)`` when given. The reply is read by
    ``parse_verdict`` (the last of correct/right/yes or incorrect/wrong/no).

    Args:
        reference_key: the info key holding the gold answer.
        reference: a function ``episode -> gold answer`` instead of the info key.
        template: fields ``task``, ``reference``, ``answer``.
        **kwargs: ``Judge``'s arguments.
    """

    def __init__(self, *, reference_key: str = "answer", reference: Any = None,
                 template: str = REFERENCE_TEMPLATE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference_key, self.reference, self.template = reference_key, reference, template

    def gold(self, episode: Episode, agent: str) -> str:
        """The gold answer of ``episode``.

        Raises:
            KeyError: the agent's info has no ``reference_key`` (names the keys it has).
        """
        if self.reference is not None:
            return str(self.reference(episode))
        info = episode.infos.get(agent, {})
        if self.reference_key not in info:
            raise KeyError(f"{self.name}: the env's info for {agent!r} has no "
                           f"{self.reference_key!r} (keys: {sorted(info)}); set reference_key= "
                           "or reference=<episode -> gold answer>")
        return str(info[self.reference_key])

    def render(self, episode: Episode, agent: str) -> str:
        """The prompt the judge model sees for ``agent``'s answer."""
        return self.template.format(task=task_of(episode, agent), answer=answer_of(episode, agent),
                                    reference=self.gold(episode, agent))

    async def __call__(self, episode: Episode) -> dict[str, float]:
        agent = self._agent(episode)
        reply = await self._ask(self.render(episode, agent))
        try:
            verdict = parse_verdict(reply)
        except JudgeParseError as e:
            return {agent: self._unreadable(e)}
        return {agent: self._scored(1.0 if verdict == "correct" else 0.0)}


class GroupJudge(Judge):
    """Group-relative (RULER-style): one call scores every answer of a GRPO group.

    The prompt lists the group's answers as ``Candidate <i>:`` blocks under the shared task;
    the reply must score each (``parse_scores``: lines ``<i>: <score>`` or JSON
    ``{"scores": [...]}``). Used as a ``Trainer(group_reward_fns=[...])`` entry: the Trainer
    calls it once per finished group, before filtering and advantages, and adds each score
    (mapped to [0, 1] with ``normalize``) to that episode's samples. An unreadable reply fails
    (or falls back for) the whole group.

    Args:
        rubric: what a good answer is.
        scale: ``(low, high)`` of each score.
        normalize: reward ``(score - low) / (high - low)``.
        template: fields ``rubric``, ``task``, ``candidates``, ``low``, ``high``.
        **kwargs: ``Judge``'s arguments.
    """

    def __init__(self, rubric: str = "Which answers solve the task best?", *,
                 scale: tuple[float, float] = (0, 10), normalize: bool = True,
                 template: str = GROUP_TEMPLATE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not scale[0] < scale[1]:
            raise ConfigError(f"GroupJudge scale must be (low, high) with low < high, got {scale}")
        self.rubric, self.scale, self.normalize, self.template = rubric, scale, normalize, template

    def render(self, episodes: Sequence[Episode]) -> str:
        """The prompt listing every episode's answer (task from the first episode)."""
        agent = self._agent(episodes[0])
        candidates = "\n\n".join(f"Candidate {i}:\n{answer_of(e, agent)}"
                                 for i, e in enumerate(episodes, 1))
        low, high = self.scale
        return self.template.format(rubric=self.rubric, task=task_of(episodes[0], agent),
                                    candidates=candidates, low=low, high=high)

    async def __call__(self, episodes: Sequence[Episode]) -> list[dict[str, float]]:
        if not episodes:
            return []
        agent = self._agent(episodes[0])
        reply = await self._ask(self.render(episodes), episodes=len(episodes))
        low, high = self.scale
        try:
            scores = parse_scores(reply, len(episodes), low, high)
        except JudgeParseError as e:
            value = self._unreadable(e, episodes=len(episodes))
            return [{agent: value} for _ in episodes]
        return [{agent: self._scored((s - low) / (high - low) if self.normalize else s)}
                for s in scores]
