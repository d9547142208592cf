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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from areal_agents.agent import Agent
from areal_agents.agents import ScriptedAgent
from areal_agents.episode import run_episode
from areal_agents.errors import TrainError
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
    """

    transcripts: dict[str, list[Transcript]] = field(default_factory=dict)
    num_episodes: int = 0
    num_failed: int = 0


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
        seed: int = 0, pad_token_id: int = 0, target_loss: float | None = None) -> list[float]:
    """``steps`` SFT steps of ``min(batch_size, len(samples))`` samples each with
    ``SFTTrainer``'s loop (token-mean NLL); samples are drawn in shuffled passes (seeded), so
    every demonstration is seen once before any is repeated. Returns each step's loss.

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
    """

    samples: list[Sample]
    steps: int
    lr: float
    seed: int = 0
    pad_token_id: int = 0
    batch_size: int = 32
    target_loss: float | None = None

    def run(self, engine: TrainEngine) -> list[float]:
        """``sft`` on ``engine`` (built at ``lr``); returns each step's loss."""
        return sft(engine, self.samples, self.steps, self.batch_size, self.seed,
                   self.pad_token_id, self.target_loss)


def warm_start_plan(policy: Policy, tokenizer: Any, transcripts: list[list[dict[str, Any]]],
                    seed: int = 0) -> WarmStartPlan | None:
    """The warm start of ``policy`` on ``transcripts`` (tokenized for ``policy.api``, seen
    as ``policy.context`` shows them: ``last_turn``), or ``None`` when there is nothing to do
    (no transcripts or ``sft_steps=0``)."""
    if policy.context == "last":
        transcripts = [last_turn(t) for t in transcripts]
    samples = demo_samples(tokenizer, transcripts, policy.api)
    if not samples or not policy.sft_steps:
        return None
    return WarmStartPlan(samples, policy.sft_steps, policy.sft_lr, seed,
                         tokenizer.pad_token_id or 0, target_loss=policy.sft_target_loss)


async def warm_start_policy(policy: Policy, model: Any, tokenizer: Any,
                            factory: Callable[..., TrainEngine],
                            transcripts: list[list[dict[str, Any]]], seed: int = 0
                            ) -> list[float]:
    """Fit ``model`` in place to ``transcripts`` (``warm_start_plan``) for
    ``policy.sft_steps`` steps at ``policy.sft_lr`` on a temporary ``factory`` engine in this
    process, in a worker thread; returns the step losses (``[]`` without transcripts or
    steps). A worker-group policy warms up on its ranks instead (``WorkerGroupEngine``)."""
    plan = warm_start_plan(policy, tokenizer, transcripts, seed)
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
