"""Format-only SFT warm start: imitate demonstration players (e.g. random valid actions).

The demonstrations teach the output *format* (a valid message, a valid pick) without any
task skill when the players act at random, so RL starts from chance. Prompts are rendered
with the policy's chat template exactly as the gateway renders them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from areal_agents.agents import ScriptedAgent

from areal_agents.agent import Agent
from areal_agents.episode import run_episode
from areal_agents.gateway.chat import encode, render
from areal_agents.samples import Sample, TokenBatch, collate

from .base import TrainEngine


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


async def collect_demos(
    make_env: Callable[[], Any], players: Mapping[str, Agent | str], seeds: range
) -> dict[str, list[list[dict[str, Any]]]]:
    """Per agent id, one transcript per (episode, action): chat messages ending with the action.

    A player ``"random"`` acts with the env's ``sample_action(agent_id)``.
    """
    demos: dict[str, list[list[dict[str, Any]]]] = {a: [] for a in players}
    for seed in seeds:
        env = make_env()
        agents = {a: EnvRandomAgent(env, a) if p == "random" else resolve_player(p)
                  for a, p in players.items()}
        try:
            episode = await run_episode(env, agents, seed=seed, raise_errors=True)
        finally:
            await env.close()
        for agent_id, messages in episode.messages.items():
            if agent_id not in demos:
                continue
            for i, m in enumerate(messages):
                if m.get("role") == "assistant":
                    demos[agent_id].append([dict(x) for x in messages[: i + 1]])
    return demos


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


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
    """``LossFn``: token-mean negative log-likelihood with batch-global ``loss_weights``."""
    assert mb.loss_weights is not None
    loss = -(logprobs * mb.loss_weights).sum()
    return loss, {"nll": loss.detach()}


def sft(engine: TrainEngine, samples: list[Sample], steps: int, batch_size: int = 32,
        seed: int = 0) -> list[float]:
    """``steps`` SFT steps on random mini-batches of ``samples``; the loss of each step.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("warm start has no demonstrations; check the demo players act")
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(samples), (min(batch_size, len(samples)),), generator=gen)
        rows = [samples[i] for i in idx.tolist()]
        batch = collate(rows)
        batch.loss_weights = batch.loss_mask / batch.loss_mask.sum().clamp(min=1)
        losses.append(float(engine.train_step(batch, nll_loss)["loss"]))
    return losses
