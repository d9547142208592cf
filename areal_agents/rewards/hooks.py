"""What the Trainer asks of reward functions: the policies they call, binding their client,
group rewards, and their metrics (judge tokens per trained token)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from areal_agents.episode import Episode
from areal_agents.errors import ConfigError

__all__ = ["GroupRewardFn", "ModelReward", "RewardHooks", "apply_group_reward_fns",
           "bind_reward_fns", "reward_fn_metrics", "reward_fn_policies"]

GroupRewardFn = Callable[[list[Episode]],
                         "Sequence[float | dict[str, float]] | Awaitable[Sequence[float | dict[str, float]]]"]
"""``fn(episodes_of_one_group) -> [float (every agent) | {agent_id: float}] per episode``."""


@runtime_checkable
class ModelReward(Protocol):
    """A reward function that calls a model: the Trainer serves ``policy`` (when not None)
    even if no agent acts with it, ``bind``s its gateway client, and logs ``take_metrics()``
    every step."""

    @property
    def policy(self) -> str | None: ...

    def bind(self, client: Any, model: str | None = None) -> None: ...

    def take_metrics(self) -> dict[str, float]: ...


def reward_fn_policies(fns: Iterable[Any]) -> set[str]:
    """The run's policies that reward functions call (they must be served)."""
    return {fn.policy for fn in fns if isinstance(fn, ModelReward) and fn.policy is not None}


def bind_reward_fns(fns: Iterable[Any], client: Any) -> None:
    """Give every policy-backed reward function the Trainer's (unrecorded) gateway client."""
    for fn in fns:
        if isinstance(fn, ModelReward) and fn.policy is not None:
            fn.bind(client)


def reward_fn_metrics(fns: Iterable[Any], trained_tokens: float) -> dict[str, float]:
    """Every model reward's ``take_metrics()`` plus ``judge/<name>/tokens_per_trained_token``
    (its prompt + completion tokens this step over the generated tokens trained this step)."""
    out: dict[str, float] = {}
    for fn in fns:
        if isinstance(fn, ModelReward):
            metrics = fn.take_metrics()
            out.update(metrics)
            for key, value in metrics.items():
                if key.endswith("/tokens") and trained_tokens > 0:
                    out[key + "_per_trained_token"] = value / trained_tokens
    return out


async def apply_group_reward_fns(episodes: list[Episode], fns: Sequence[GroupRewardFn]
                                 ) -> list[dict[str, float]]:
    """Every group reward function's contribution, per episode and agent.

    Raises:
        TypeError: a function returned something else than one number or dict per episode.
        ValueError: a wrong number of rewards, or a reward for an agent not in the episode.
    """
    total: list[dict[str, float]] = [{a: 0.0 for a in e.agents} for e in episodes]
    for fn in fns:
        values = fn(episodes)
        if inspect.isawaitable(values):
            values = await values
        if not isinstance(values, Sequence) or len(values) != len(episodes):
            raise ValueError(f"group reward function {fn!r} must return one reward per episode "
                             f"({len(episodes)}), got {values!r}")
        for episode, row, value in zip(episodes, total, values, strict=True):
            if isinstance(value, Mapping):
                unknown = sorted(set(value) - set(episode.agents))
                if unknown:
                    raise ValueError(f"group reward function {fn!r} rewarded unknown agents "
                                     f"{unknown}; the episode's agents are {episode.agents}")
                for agent, reward in value.items():
                    row[agent] += float(reward)
            elif isinstance(value, int | float):
                for agent in row:
                    row[agent] += float(value)
            else:
                raise TypeError(f"group reward function {fn!r} returned {type(value).__name__} "
                                "for an episode; return a float or {agent_id: float}")
    return total


class RewardHooks:
    """The Trainer's side of its reward functions, in one object.

    It names the policies judges call (``policies``: the Trainer serves them), binds the
    Trainer's gateway client (admin key: judge calls are not recorded, so never trained on),
    keeps each finished training episode's record until its group ends, then runs
    ``group_reward_fns`` on the group's episodes and adds their rewards to the samples
    (``on_group``, the ``RolloutController``'s ``group_fn``), and gathers judge metrics.

    Args:
        reward_fns, group_reward_fns: the Trainer's lists.
        policies: ``{name: Policy}`` of the run; used_policies: those agents act with.
        partial_groups: the Trainer's setting (group rewards need whole groups).

    Raises:
        ConfigError: a judge names an unknown policy, or a trainable policy no agent acts
            with (judge calls are not trained on: make it frozen), or ``partial_groups``
            with group reward functions.
    """

    def __init__(self, reward_fns: Sequence[Any], group_reward_fns: Sequence[GroupRewardFn],
                 policies: Mapping[str, Any], used_policies: Iterable[str],
                 partial_groups: int = 0) -> None:
        self.reward_fns, self.group_reward_fns = list(reward_fns), list(group_reward_fns)
        self.policies = reward_fn_policies([*self.reward_fns, *self.group_reward_fns])
        unknown = sorted(self.policies - set(policies))
        if unknown:
            raise ConfigError(f"reward functions call policies {unknown} that are not in "
                              f"policies={sorted(policies)}; add them (e.g. Policy(frozen=True))")
        used = set(used_policies)
        trainable = sorted(p for p in self.policies - used if policies[p].trainable)
        if trainable:
            raise ConfigError(f"judge policies {trainable} are trainable but no agent acts with "
                              "them, and judge calls are not trained on; set frozen=True")
        if self.group_reward_fns and partial_groups:
            raise ConfigError("group_reward_fns score whole groups; set partial_groups=0")
        self._policies = dict(policies)
        self._episodes: dict[int, dict[int, Episode]] = {}

    def bind(self, client: Any) -> None:
        """Give policy-backed reward functions the Trainer's gateway client; a judge of an
        ``endpoint`` policy gets a client of that server (key from ``OPENAI_API_KEY``)."""
        fns = [*self.reward_fns, *self.group_reward_fns]
        bind_reward_fns([fn for fn in fns if not self._endpoint(fn)], client)
        for fn in fns:
            if self._endpoint(fn):
                import openai

                policy = self._policies[fn.policy]
                fn.bind(openai.AsyncOpenAI(base_url=policy.endpoint,
                                           api_key=os.environ.get("OPENAI_API_KEY", "none")),
                        str(policy.model or "default"))

    def _endpoint(self, fn: Any) -> bool:
        return (isinstance(fn, ModelReward) and fn.policy is not None
                and self._policies[fn.policy].endpoint is not None)

    def record(self, seed: int, member: int, episode: Episode | None) -> None:
        """Keep a finished training episode until its group ends (only with group fns)."""
        if self.group_reward_fns and episode is not None:
            self._episodes.setdefault(seed, {})[member] = episode

    async def on_group(self, seed: int, results: list[Any]) -> None:
        """Add the group reward functions' rewards to the samples of the group's finished
        episodes (``results[m]``: ``{policy: samples}``, or an exception for a failed one)."""
        episodes = self._episodes.pop(seed, {})
        members = [m for m, r in enumerate(results)
                   if isinstance(r, Mapping) and m in episodes]
        if not members:
            return
        rewards = await apply_group_reward_fns([episodes[m] for m in members],
                                               self.group_reward_fns)
        for m, row in zip(members, rewards, strict=True):
            for samples in results[m].values():
                for sample in samples:
                    sample.add_reward(row.get(sample.agent, 0.0))

    def forget(self, keep: Iterable[int]) -> None:
        """Drop the records of groups that ended without ``on_group`` (cancelled)."""
        keep = set(keep)
        for seed in [s for s in self._episodes if s not in keep]:
            del self._episodes[seed]

    def metrics(self, step_metrics: Mapping[str, float]) -> dict[str, float]:
        """Judge metrics of this step (``reward_fn_metrics``); trained tokens are read from
        ``policy/<p>/num_samples`` x ``policy/<p>/trained_gen_len`` of ``step_metrics``."""
        trained = sum(v * step_metrics.get(k[: -len("num_samples")] + "trained_gen_len", 0.0)
                      for k, v in step_metrics.items()
                      if k.startswith("policy/") and k.endswith("/num_samples"))
        return reward_fn_metrics([*self.reward_fns, *self.group_reward_fns], trained)
