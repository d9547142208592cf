"""Format-only SFT warm start: imitate demonstration players (e.g. random valid actions).

The demonstrations teach the output *format* (a valid message, a valid pick) without any
task skill when the players act at random, so RL starts from chance. Prompts are rendered
with the policy's chat template exactly as the gateway renders them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from areal_agents.agent import Agent
from areal_agents.agents import ScriptedAgent
from areal_agents.episode import run_episode
from areal_agents.errors import ConfigError, TrainError
from areal_agents.gateway.chat import encode, render
from areal_agents.samples import Sample

from .base import TrainEngine
from .policy import Policy
from .sft import SFTTrainer

log = logging.getLogger(__name__)


def resolve_player(spec: str | Callable[..., Any] | Agent) -> Agent:
    """An ``Agent`` from a player: an Agent, a callable ``player(observation) -> action``, a
    name in ``areal_agents.agents.players`` or ``"module:attr"``.

    Raises:
        ValueError: the name does not resolve (lists the module searched).
    """
    if isinstance(spec, Agent):
        return spec
    if isinstance(spec, str):
        module_name, _, attr = spec.rpartition(":")
        module = importlib.import_module(module_name or "areal_agents.agents.players")
        if not hasattr(module, attr):
            raise ValueError(f"player {spec!r} not found in {module.__name__}; give a name defined"
                             " there or 'package.module:attr'")
        spec = getattr(module, attr)
        if isinstance(spec, type):
            spec = spec()
    if isinstance(spec, Agent):
        return spec
    return ScriptedAgent(spec)


class EnvRandomAgent(Agent):
    """Acts with ``env.sample_action(agent_id)``: random *valid* actions, no task skill."""

    def __init__(self, env: Any, agent_id: str) -> None:
        if not hasattr(env, "sample_action"):
            raise ValueError(f"{type(env).__name__} has no sample_action(agent); give warm-start "
                             "players explicitly")
        self.env, self.agent_id = env, agent_id

    async def act(self, observation: Any) -> Any:
        return self.env.sample_action(self.agent_id)


Transcript = list[dict[str, Any]]
"""Chat messages of one episode up to and including one of the agent's actions."""


@dataclass
class Demos:
    """The demonstrations ``collect_demos`` gathered.

    Attributes:
        transcripts: per agent id, one transcript per (finished episode, action of the agent).
        num_episodes: episodes that finished; their transcripts are kept.
        num_failed: episodes whose env or player raised; skipped (logged, no transcripts).
        shares: how a warm start fitting several agents mixes their demos in its batches
            (``trainer.warm_start.shares``, ``parse_shares``; ``None``: alike).
    """

    transcripts: dict[str, list[Transcript]] = field(default_factory=dict)
    num_episodes: int = 0
    num_failed: int = 0
    shares: list[MixStage] | None = None

    def of_agents_of(self, policy_of: Mapping[str, str],
                     policies: Collection[str]) -> dict[str, list[Transcript]]:
        """The transcripts of every agent ``policy_of`` maps to one of ``policies``, in
        ``policy_of``'s order (an agent without demos gets an empty list).

        Example:
            >>> demos = Demos({"a": [[{"role": "user", "content": "hi"}]]})
            >>> demos.of_agents_of({"a": "p", "b": "p", "c": "q"}, {"p"})
            {'a': [[{'role': 'user', 'content': 'hi'}]], 'b': []}
        """
        return {agent: self.transcripts.get(agent, []) for agent, policy in policy_of.items()
                if policy in policies}


async def collect_demos(
    make_env: Callable[[], Any], players: Mapping[str, Agent | str], seeds: Sequence[int],
    *, min_episodes: int | None = None,
) -> Demos:
    """Play one demonstration episode per seed; keep the finished ones.

    A player ``"random"`` acts with the env's ``sample_action(agent_id)``. An episode whose env
    or player raises is counted in ``num_failed`` and skipped, as the RL phase counts and skips
    a failed episode; collection fails only when too few episodes finish.

    Args:
        min_episodes: finished episodes needed (default: half of ``seeds``, rounded up).

    Raises:
        TrainError: fewer than ``min_episodes`` episodes finished (the message gives the
            counts and the last error).
    """
    needed = math.ceil(len(seeds) / 2) if min_episodes is None else min_episodes
    demos = Demos({a: [] for a in players})
    last_error = ""
    for seed in seeds:
        env = make_env()
        agents = {a: EnvRandomAgent(env, a) if p == "random" else resolve_player(p)
                  for a, p in players.items()}
        try:
            episode = await run_episode(env, agents, seed=seed)
        finally:
            await env.close()
        if episode.status == "failed":
            demos.num_failed += 1
            last_error = episode.error or ""
            log.warning("warm start: demo episode seed=%d failed and is skipped: %s", seed,
                        last_error)
            continue
        demos.num_episodes += 1
        for agent_id, messages in episode.messages.items():
            if agent_id not in demos.transcripts:
                continue
            for i, m in enumerate(messages):
                if m.get("role") == "assistant":
                    demos.transcripts[agent_id].append([dict(x) for x in messages[: i + 1]])
    if demos.num_episodes < needed:
        raise TrainError(
            f"warm start: {demos.num_episodes} of {len(seeds)} demo episodes finished "
            f"({demos.num_failed} failed; the last error: {last_error}), {needed} are needed; "
            "fix the env or the demo players, or lower warm_start.min_episodes")
    return demos


def last_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A transcript ending in a reply as a ``Policy(context="last")`` agent saw it: the
    system messages, the messages after the previous reply, and the reply.

    Example:
        >>> t = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"},
        ...      {"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}]
        >>> [m["content"] for m in last_turn(t)]
        ['b', '2']
    """
    *before, reply = messages
    cut = max((i for i, m in enumerate(before) if m.get("role") == "assistant"), default=-1)
    system = [m for m in before[: cut + 1] if m.get("role") == "system"]
    return [*system, *before[cut + 1 :], reply]


def demo_samples(tokenizer: Any, transcripts: list[list[dict[str, Any]]],
                 api: str = "chat") -> list[Sample]:
    """Tokenize transcripts as the gateway does for ``api`` ("chat": chat template;
    "completions": ``raw_prompt``): the last assistant message (plus EOS) is under the loss mask.
    """
    from .llm_session import raw_prompt

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    out = []
    for messages in transcripts:
        text = (raw_prompt(messages[:-1]) if api == "completions"
                else render(tokenizer, messages[:-1], None, True))
        prompt = encode(tokenizer, text)
        completion = [*encode(tokenizer, str(messages[-1].get("content") or "")), eos]
        ids = prompt + completion
        n, k = len(ids), len(completion)
        out.append(Sample(ids, [0] * (n - k) + [1] * k, [0.0] * n, [-1] * (n - k) + [0] * k))
    return out


SFT_LOSS_WINDOW = 10
"""Steps whose mean SFT loss ``sft(target_loss=...)`` compares with the target."""


def sft(engine: TrainEngine, samples: list[Sample], steps: int, batch_size: int = 32,
        seed: int = 0, pad_token_id: int = 0, target_loss: float | None = None,
        mix: tuple[dict[str, list[Sample]], list[MixStage]] | None = None) -> list[float]:
    """``steps`` SFT steps of ``min(batch_size, len(samples))`` samples each with
    ``SFTTrainer``'s loop (token-mean NLL); samples are drawn in shuffled passes (seeded), so
    every demonstration is seen once before any is repeated. Returns each step's loss.

    With ``mix`` (``(samples per agent, stages)``, ``samples`` then their concatenation),
    each step's batch is drawn by ``mixed_schedule`` instead: each agent's share of it as its
    stage says.

    With ``target_loss``, stops after the first step at which the mean loss of the last
    ``SFT_LOSS_WINDOW`` steps is below it (``steps`` is then the maximum); the steps taken
    are the same as the first steps of a run without it.

    Raises:
        ValueError: no samples (or none with a target token).
    """
    if not samples:
        raise ValueError("warm start has no demonstrations; check the demo players act")
    rng = random.Random(seed)
    k = min(batch_size, len(samples))
    schedule: list[Sample] = []
    order: list[int] = []
    if mix is not None:
        schedule = mixed_schedule(mix[0], mix[1], steps, k, seed)
    while len(schedule) < steps * k:
        if not order:
            order = list(range(len(samples)))
            rng.shuffle(order)
        schedule.append(samples[order.pop()])
    def reached(history: list[dict[str, float]]) -> bool:
        assert target_loss is not None
        if len(history) < SFT_LOSS_WINDOW:
            return False
        mean = window_mean([float(h["loss"]) for h in history[-SFT_LOSS_WINDOW:]])
        if mean >= target_loss:
            return False
        log.info("warm start: mean SFT loss of the last %d steps %.4f < target %.4f after %d "
                 "of %d steps; stopping", SFT_LOSS_WINDOW, mean, target_loss, len(history), steps)
        return True

    trainer = SFTTrainer(engine, batch_size=k, pad_token_id=pad_token_id, seed=seed)
    history = trainer.fit(schedule, epochs=1, shuffle=False,
                          stop=None if target_loss is None else reached)
    return [float(h["loss"]) for h in history]


@dataclass(frozen=True)
class MixStage:
    """One stage of a warm start's batch mix (``trainer.warm_start.shares``).

    Attributes:
        steps: the stage's SFT steps (``None``: the rest of the warm start; last stage only).
        shares: per agent id, its relative share of each batch in the stage (normalised over
            the agents the warm start fits; an agent left out has share 0 in the stage).
    """

    steps: int | None
    shares: dict[str, float]


def parse_shares(spec: Any, agents: Sequence[str] | None = None) -> list[MixStage] | None:
    """The stages of ``trainer.warm_start.shares``: ``None`` (off: each batch draws from all
    demos alike, as without the option), a mapping ``{agent: share}`` (one stage, every
    step), or a list of ``{steps: n, shares: {agent: share}}`` (stage by stage; the last may
    leave out ``steps``: the rest of the warm start). With ``agents`` (the demo players'
    agent ids), every agent named must be one of them.

    Example:
        >>> parse_shares({"speaker": 3, "listener": 1})
        [MixStage(steps=None, shares={'speaker': 3.0, 'listener': 1.0})]

    Raises:
        ConfigError: an agent not in ``agents``, a share that is not a number >= 0, a
            stage with no positive share, a stage's ``steps`` not an int >= 1, ``steps``
            missing on a stage before the last, or any other shape (the message shows the
            expected one).
    """
    if spec is None:
        return None
    shape = ("warm_start.shares takes {agent: share} or a list of {steps: n, shares: "
             "{agent: share}} (the last stage may leave out steps)")
    raw = [{"steps": None, "shares": spec}] if isinstance(spec, Mapping) else spec
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ConfigError(f"{shape}; got {spec!r}")
    stages = []
    for i, stage in enumerate(raw):
        if not isinstance(stage, Mapping) or set(stage) - {"steps", "shares"} \
                or not isinstance(stage.get("shares"), Mapping):
            raise ConfigError(f"{shape}; stage {i} is {stage!r}")
        unknown = sorted(set(map(str, stage["shares"])) - set(agents or stage["shares"]))
        if unknown:
            raise ConfigError(f"warm_start.shares: stage {i} names agents {unknown} that have "
                              f"no demo player; the warm start's agents: {sorted(agents or [])}")
        steps = stage.get("steps")
        if steps is None and i < len(raw) - 1:
            raise ConfigError(f"warm_start.shares: stage {i} needs steps (only the last stage "
                              "may run the rest)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ConfigError(f"warm_start.shares: stage {i} has steps={steps!r}; give an "
                              "int >= 1")
        shares = {}
        for agent, share in stage["shares"].items():
            if isinstance(share, bool) or not isinstance(share, int | float) \
                    or not math.isfinite(share) or share < 0:
                raise ConfigError(f"warm_start.shares: stage {i} gives agent {agent!r} share "
                                  f"{share!r}; give a number >= 0")
            shares[str(agent)] = float(share)
        if not any(shares.values()):
            raise ConfigError(f"warm_start.shares: stage {i} gives no agent a share > 0")
        stages.append(MixStage(steps, shares))
    return stages


def mixed_schedule(groups: Mapping[str, Sequence[Sample]], stages: Sequence[MixStage],
                   steps: int, batch_size: int, seed: int = 0) -> list[Sample]:
    """``steps`` batches of ``batch_size`` samples (concatenated), each holding the agents'
    demos in the proportions of its stage: ``share / sum of the stage's shares over
    groups`` of every batch, rounded per step with the remainders carried to the next step
    (so over a stage each agent's count is within one of its exact share). Each agent's
    samples are drawn in their own shuffled passes (seeded by ``seed`` and the agent), every
    one seen once before any is repeated. Stages run in order for their ``steps``; the last
    one (or one without ``steps``) runs to the end.

    Raises:
        ValueError: a stage gives no agent of ``groups`` a share > 0, or gives a share to an
            agent without samples.
    """
    orders = {a: [] for a in groups}
    rngs = {a: random.Random(f"{seed}:{a}") for a in groups}

    def draw(agent: str) -> Sample:
        if not orders[agent]:
            orders[agent] = list(range(len(groups[agent])))
            rngs[agent].shuffle(orders[agent])
        return groups[agent][orders[agent].pop()]

    out: list[Sample] = []
    stage_ends, end = [], 0
    for stage in stages:
        end = steps if stage.steps is None else end + stage.steps
        stage_ends.append(end)
    for i, stage in enumerate(stages):
        shares = {a: Fraction(stage.shares.get(a, 0.0)) for a in groups}  # exact sums
        total = sum(shares.values())
        if total <= 0:
            raise ValueError(f"warm start: stage {i} of the shares gives none of the agents "
                             f"{sorted(groups)} a share > 0")
        empty = [a for a, s in shares.items() if s > 0 and not groups[a]]
        if empty:
            raise ValueError(f"warm start: agents {empty} have a share but no demonstrations")
        carry = dict.fromkeys(groups, Fraction(0))
        first = 0 if i == 0 else stage_ends[i - 1]
        last = steps if i == len(stages) - 1 else min(stage_ends[i], steps)
        for _ in range(first, last):
            quota = {a: batch_size * s / total + carry[a] for a, s in shares.items()}
            counts = {a: math.floor(q) for a, q in quota.items()}
            spare = batch_size - sum(counts.values())
            for a in sorted(quota, key=lambda a: counts[a] - quota[a])[:spare]:
                counts[a] += 1
            carry = {a: quota[a] - counts[a] for a in quota}
            for a in groups:
                out += [draw(a) for _ in range(counts[a])]
    return out


def window_mean(losses: Sequence[float]) -> float:
    """The mean of the last ``SFT_LOSS_WINDOW`` of ``losses`` (all of them when fewer)."""
    recent = losses[-SFT_LOSS_WINDOW:]
    return sum(recent) / len(recent)


def warm_start_metrics(name: str, losses: Sequence[float]) -> dict[str, float]:
    """The ``warm_start/<name>/...`` metrics of an SFT warm start's per-step ``losses``: the
    first and the last step's loss (``nll_first``, ``nll_last``: one batch, noisy), the mean
    of the last ``SFT_LOSS_WINDOW`` steps (``nll_last_mean``: what ``target_loss`` compares)
    and the steps taken (``steps``: fewer than ``sft_steps`` when a target stopped it).

    Example:
        >>> warm_start_metrics("p", [2.0, 1.0, 0.5])["warm_start/p/nll_last_mean"]
        1.1666666666666667
    """
    if not losses:
        return {}
    return {f"warm_start/{name}/nll_first": float(losses[0]),
            f"warm_start/{name}/nll_last": float(losses[-1]),
            f"warm_start/{name}/nll_last_mean": window_mean(losses),
            f"warm_start/{name}/steps": float(len(losses))}


def warm_start_label(steps: int, target_loss: float | None) -> str:
    """How a start-up line names a warm start's length, e.g. ``"300 steps"`` or ``"up to 450
    steps, until the 10-step mean loss < 0.6"``."""
    if target_loss is None:
        return f"{steps} steps"
    return f"up to {steps} steps, until the {SFT_LOSS_WINDOW}-step mean loss < {target_loss:g}"


@dataclass
class WarmStartPlan:
    """An SFT warm start ready to run on any ``TrainEngine`` (``run``), e.g. on the ranks of a
    worker group (``WorkerGroupEngine(warm_start=...)``: each rank trains on its rows).

    Attributes:
        samples: the tokenized demonstrations (``demo_samples``).
        steps: SFT steps (``Policy.sft_steps``).
        lr: the warm start's learning rate (``Policy.sft_lr``).
        seed: the shuffling seed.
        pad_token_id: padding id of the batches.
        batch_size: samples per step at most.
        target_loss: stop early at this mean loss (``Policy.sft_target_loss``; ``sft``).
        mix: ``(samples per agent, stages)``: each batch mixes the agents' demos as the
            stages say (``trainer.warm_start.shares``; ``mixed_schedule``); ``None``: every
            batch draws from ``samples`` alike.
    """

    samples: list[Sample]
    steps: int
    lr: float
    seed: int = 0
    pad_token_id: int = 0
    batch_size: int = 32
    target_loss: float | None = None
    mix: tuple[dict[str, list[Sample]], list[MixStage]] | None = None

    def run(self, engine: TrainEngine) -> list[float]:
        """``sft`` on ``engine`` (built at ``lr``); returns each step's loss."""
        return sft(engine, self.samples, self.steps, self.batch_size, self.seed,
                   self.pad_token_id, self.target_loss, self.mix)


Transcripts = list[Transcript] | Mapping[str, list[Transcript]]
"""A warm start's demos: a list of transcripts, or the transcripts of each agent (in order)."""


def warm_start_plan(policy: Policy, tokenizer: Any, transcripts: Transcripts, seed: int = 0,
                    shares: Sequence[MixStage] | None = None) -> WarmStartPlan | None:
    """The warm start of ``policy`` on ``transcripts`` (tokenized for ``policy.api``, seen
    as ``policy.context`` shows them: ``last_turn``), or ``None`` when there is nothing to do
    (no transcripts or ``sft_steps=0``).

    ``transcripts`` per agent are fitted as their concatenation, unless ``shares``
    (``parse_shares``) names one of those agents and there are two or more of them: then
    each batch mixes the agents' demos as the stages say (``WarmStartPlan.mix``). Without
    ``shares``, or with demos of one agent only, the plan is the plain one, bit for bit.
    """
    by_agent = dict(transcripts) if isinstance(transcripts, Mapping) else {"": transcripts}
    if policy.context == "last":
        by_agent = {a: [last_turn(t) for t in ts] for a, ts in by_agent.items()}
    groups = {a: demo_samples(tokenizer, ts, policy.api) for a, ts in by_agent.items()}
    samples = [s for g in groups.values() for s in g]
    if not samples or not policy.sft_steps:
        return None
    mixed = shares is not None and len(groups) > 1 and any(
        a in stage.shares for stage in shares for a in groups)
    return WarmStartPlan(samples, policy.sft_steps, policy.sft_lr, seed,
                         tokenizer.pad_token_id or 0, target_loss=policy.sft_target_loss,
                         mix=(groups, list(shares)) if mixed else None)


async def warm_start_policy(policy: Policy, model: Any, tokenizer: Any,
                            factory: Callable[..., TrainEngine], transcripts: Transcripts,
                            seed: int = 0, shares: Sequence[MixStage] | None = None
                            ) -> list[float]:
    """Fit ``model`` in place to ``transcripts`` (``warm_start_plan``, with ``shares``) for
    ``policy.sft_steps`` steps at ``policy.sft_lr`` on a temporary ``factory`` engine in this
    process, in a worker thread; returns the step losses (``[]`` without transcripts or
    steps). A worker-group policy warms up on its ranks instead (``WorkerGroupEngine``)."""
    plan = warm_start_plan(policy, tokenizer, transcripts, seed, shares)
    if plan is None:
        return []
    engine = factory(model, lr=plan.lr)
    try:
        losses = await asyncio.to_thread(plan.run, engine)
        # engines that train their own copy (Archon, Megatron) hand the weights back here
        copy_weights_into(model, engine.export_weights())
        return losses
    finally:
        engine.close()


@torch.no_grad()
def copy_weights_into(model: Any, named_tensors: Any) -> None:
    """Copy HF-named tensors into ``model`` (tied weights once). A no-op in effect when
    ``model`` is the engine's own module (FSDPEngine trains it in place).

    Raises:
        KeyError: a name ``model`` does not have (names it).
    """
    params = model.state_dict(keep_vars=True)  # tied weights appear under both names
    for name, tensor in named_tensors:
        if name not in params:
            raise KeyError(f"warm start: the engine exported {name!r}, which the model does not "
                           "have; the backend's export names must be Hugging Face names")
        target = params[name]
        if target.data_ptr() != tensor.data_ptr():
            target.copy_(tensor.to(target.dtype))
