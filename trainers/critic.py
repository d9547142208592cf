"""Learned critics for PPO: a scalar value head on a policy-architecture backbone, trained with
the clipped value loss by its own optimiser (one critic per trainable policy).

Value alignment follows the log-prob rule of ``areal_agents.samples``: ``values[t]`` is the
critic's estimate *before* token t is emitted, read from the hidden state of token ``t - 1``
(so ``values[:, 0] == 0``, and padding is 0), exactly where ``logprobs[t]`` is read. GAE then
uses the values at generated positions only (``algorithms.advantages.gae``).

Per train step of a policy with a critic (``Trainer``)::

    batch.values = critic.values(batch)            # [B, T], no grad: V_old
    batch = algorithm.prepare(batch, samples)     # GAE: advantages, returns
    engine.train_step(batch, algorithm.loss)      # the policy (not during CriticSpec.warmup_steps)
    critic.update(batch, algorithm)                # num_updates steps of the clipped value loss

Backends: the critic runs the policy backend's model family in the trainer's process:
``"fsdp"`` a ``transformers`` backbone (the causal LM without its head), ``"archon"`` an Archon
``Transformer`` without its output projection. It shares the backends' micro-batching and
optimizer-step loop (``trainers/step.py``). Worker-group (``Policy.train.world_size > 1``)
critics are not implemented: ``CriticSpec.check`` refuses them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch
from torch import nn

from areal_agents.errors import ConfigError
from areal_agents.samples import TokenBatch

from .base import LossFn
from .microbatch import plan_microbatches
from .step import accumulate_microbatches, plan_rank_microbatches, run_train_step

__all__ = ["CRITIC_BACKENDS", "CriticEngine", "CriticSpec", "ValueModel", "build_critic",
           "critic_metrics", "explained_variance"]

CriticBackend = Literal["fsdp", "archon"]
CRITIC_BACKENDS: tuple[str, ...] = get_args(CriticBackend)


@dataclass(frozen=True)
class CriticSpec:
    """A policy's learned critic (``Policy(critic=...)``; verl's ``critic`` section, TRL's
    ``value_model``).

    Args:
        model: the backbone in the forms of ``Policy.model`` (same tokenizer); ``None`` (the
            default) copies the policy's initial weights, after any warm start.
        backend: ``"fsdp"`` or ``"archon"``; ``None`` uses the policy's backend.
        lr: learning rate of the critic's own AdamW.
        max_grad_norm: grad-norm clip of the critic (``0`` disables it).
        token_budget: padded tokens per micro-batch.
        num_updates: optimizer steps on each batch (verl's critic ``ppo_epochs``); the value
            clip stays around the values the batch was collected with.
        warmup_steps: the policy's first ``warmup_steps`` train steps update the critic alone
            (verl's ``trainer.critic_warmup``): the policy's weights and optimizer stay as they
            were (the step still counts, its episodes are logged and ``critic/<p>/warmup`` is
            1), so the policy's first update sees a critic that has already fitted the returns
            of the starting policy. ``0`` (the default) updates both from the first step.

    Raises:
        ConfigError: a value out of range or an unknown backend (names the field).

    Example:
        >>> CriticSpec(lr=1e-4).backend_for("archon")
        'archon'
        >>> CriticSpec.of({"lr": 0}, "policies.p.critic")
        Traceback (most recent call last):
        ...
        areal_agents.errors.ConfigError: policies.p.critic.lr must be > 0, got 0
    """

    model: Any = None
    backend: str | None = None
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    token_budget: int = 4096
    num_updates: int = 1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        self._validate("CriticSpec")

    def _validate(self, owner: str) -> None:
        if self.backend is not None and self.backend not in CRITIC_BACKENDS:
            raise ConfigError(f"{owner}.backend={self.backend!r}; critics run on "
                              f"{list(CRITIC_BACKENDS)} (or None: the policy's backend)")
        if not self.lr > 0:
            raise ConfigError(f"{owner}.lr must be > 0, got {self.lr}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"{owner}.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        for name in ("token_budget", "num_updates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{owner}.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{owner}.warmup_steps must be >= 0, got {self.warmup_steps}")

    @classmethod
    def of(cls, value: Any, owner: str = "Policy.critic") -> CriticSpec | None:
        """``value`` (a ``CriticSpec``, a dict of its fields, or ``None``) as a spec.

        Raises:
            ConfigError: unknown fields, a wrong type, or a bad value (named with ``owner``).
        """
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{owner} must be a CriticSpec, a dict of its fields or None, got "
                              f"{type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{owner}: unknown field(s) {unknown}; known: {sorted(known)}")
        spec = object.__new__(cls)  # validate under the caller's name before building
        for f in fields(cls):
            object.__setattr__(spec, f.name, value.get(f.name, f.default))
        spec._validate(owner)
        return spec

    def backend_for(self, policy_backend: str) -> str:
        """The backend the critic runs on (``backend``, else the policy's).

        Raises:
            ConfigError: the policy's backend has no critic (megatron, a registered one).
        """
        backend = self.backend or policy_backend
        if backend not in CRITIC_BACKENDS:
            raise ConfigError(f"a critic cannot run on backend {backend!r}; set "
                              f"critic.backend to one of {list(CRITIC_BACKENDS)}")
        return backend

    def check(self, owner: str, policy_backend: str, distributed: bool) -> None:
        """Refuse what the critic cannot do for a policy on ``policy_backend``.

        Args:
            owner: the field named in errors (``"policies.p.critic"``).

        Raises:
            ConfigError: a worker-group policy (``train.world_size > 1``), or a backend
                without critics.
        """
        self.backend_for(policy_backend)
        if distributed:
            raise ConfigError(
                f"{owner}: a learned critic is not implemented for worker-group policies "
                "(train.world_size > 1) yet; train the policy in one process (world_size 1) or "
                "drop the critic (PPO then uses zero values: discounted returns)")


class ValueModel(nn.Module):
    """A backbone returning hidden states ``[B, T, H]`` and a scalar head: ``forward(input_ids,
    attention_mask) -> [B, T]`` values, ``values[:, t] = head(h[:, t - 1])``, 0 at position 0
    and at padding. The head starts at zero, so a fresh critic predicts 0 everywhere (PPO's
    advantages then equal those without a critic).
    """

    def __init__(self, backbone: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | nn.Module,
                 hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask)  # [B, T, H]
        v = self.head(h.float()).squeeze(-1)  # [B, T]: after reading token t
        out = torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)  # before token t
        return out * attention_mask.to(out.dtype)


class _HFBackbone(nn.Module):
    """A ``transformers`` causal LM without its LM head: last hidden states."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.model = getattr(causal_lm, causal_lm.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids,
                          attention_mask=attention_mask.long()).last_hidden_state


class _ArchonBackbone(nn.Module):
    """An Archon ``Transformer`` without its output projection: final-normed hidden states
    (right padding and causal attention keep real tokens' states independent of padding)."""

    def __init__(self, model: Any) -> None:
        from .archon import build_model

        super().__init__()
        self.model = build_model(model)
        self.model.output = None  # Transformer then returns hidden states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def value_model(causal_lm: nn.Module, backend: str) -> ValueModel:
    """A ``ValueModel`` on ``backend``'s model family from a ``transformers`` causal LM (its
    weights are copied)."""
    hidden = int(causal_lm.config.hidden_size)
    backbone: nn.Module
    if backend == "archon":
        backbone = _ArchonBackbone(causal_lm)
    else:
        backbone = _HFBackbone(copy.deepcopy(causal_lm))
    return ValueModel(backbone, hidden)


class CriticEngine:
    """One critic: a ``ValueModel`` with its own AdamW, trained in this process.

    Args:
        model: a ``transformers`` causal LM whose backbone the critic starts from (copied).
        backend: ``"fsdp"`` or ``"archon"`` (the model family the backbone runs as).
        lr, max_grad_norm, token_budget, num_updates, warmup_steps: as ``CriticSpec``.
        device: defaults to CUDA when available, else CPU.

    Example:
        >>> from areal_agents.models import tiny
        >>> critic = CriticEngine(tiny("xs")[0], lr=1e-3)
        >>> critic.values(batch).shape  # doctest: +SKIP
        torch.Size([4, 37])
    """

    def __init__(self, model: nn.Module, *, backend: str = "fsdp", lr: float = 1e-5,
                 max_grad_norm: float = 1.0, token_budget: int = 4096, num_updates: int = 1,
                 warmup_steps: int = 0, device: torch.device | str | None = None) -> None:
        if backend not in CRITIC_BACKENDS:
            raise ConfigError(f"CriticEngine backend={backend!r}; choose one of "
                              f"{list(CRITIC_BACKENDS)}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.module = value_model(model, backend).to(self.device, torch.float32)
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.token_budget = token_budget
        self.num_updates = num_updates
        self.warmup_steps = warmup_steps
        self.step = 0  # optimizer steps (num_updates per batch)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    def _forward(self, mb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.module(mb.input_ids, mb.attention_mask)
        return values, torch.zeros_like(values)  # the LossFn seam: (values, unused)

    @torch.no_grad()
    def values(self, batch: TokenBatch) -> torch.Tensor:
        """``[B, T]`` float32 values of ``batch`` (CPU, no grad), aligned as the module
        docstring says."""
        self.module.eval()
        batch = batch.to(self.device)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for idx in plan_microbatches(batch.attention_mask.sum(-1).tolist(), self.token_budget):
            mb = batch.select(torch.tensor(idx))
            v, _ = self._forward(mb)
            out[idx, : v.shape[1]] = v.float().cpu()
        return out

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step; ``loss_fn(values, zeros, micro_batch)`` gets the critic's values
        with grad in the log-prob slot of ``LossFn``. Returns its summed stats, ``loss``,
        ``grad_norm``, ``lr``.

        Raises:
            TrainError: the loss is not finite.
        """
        self.module.train()
        batch = batch.to(self.device)
        slots = plan_rank_microbatches(batch.attention_mask.sum(-1).tolist(), 0, 1,
                                       self.token_budget)
        out = run_train_step(
            lambda: accumulate_microbatches(batch, slots, self._forward, loss_fn,
                                            device=self.device),
            optimizer=self.optimizer, scheduler=self.scheduler,
            clip_grad_norm=self.clip_grad_norm, num_tokens=batch.num_tokens, step=self.step)
        self.step += 1
        return out

    @property
    def warming_up(self) -> bool:
        """True while fewer than ``warmup_steps`` batches have updated the critic: the policy
        must not be updated on this batch (the count survives ``save``/``load`` via ``step``)."""
        return self.step < self.warmup_steps * self.num_updates

    def clip_grad_norm(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, clip))

    def save(self, path: str) -> None:
        """Write weights, optimizer and step to ``path/critic.pt`` (atomic)."""
        os.makedirs(path, exist_ok=True)
        state = {"model": self.module.state_dict(), "optim": self.optimizer.state_dict(),
                 "step": self.step, "backend": self.backend}
        tmp = os.path.join(path, "critic.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, "critic.pt"))

    def load(self, path: str) -> None:
        """Restore what ``save`` wrote.

        Raises:
            FileNotFoundError: ``path`` holds no critic (names the file).
            ConfigError: it was saved from another backend.
        """
        file = os.path.join(path, "critic.pt")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no critic checkpoint {file!r}: was the run started "
                                    "without critic=? start a new run_dir or drop critic=")
        state = torch.load(file, map_location=self.device, weights_only=False)
        if state["backend"] != self.backend:
            raise ConfigError(f"{file} holds a {state['backend']!r} critic but this one runs on "
                              f"{self.backend!r}; set critic.backend={state['backend']!r}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.step = int(state["step"])

    def update(self, batch: TokenBatch, algorithm: Any) -> dict[str, float]:
        """``num_updates`` steps of ``algorithm.value_loss`` on a prepared ``batch`` (with
        ``values`` = V_old and ``returns``); returns ``critic_metrics`` (the value loss and clip
        fraction averaged over the updates).

        Raises:
            ValueError: ``batch`` has no ``values`` or ``returns``.
        """
        if batch.values is None or batch.returns is None:
            raise ValueError("CriticEngine.update needs batch.values (critic.values(batch) "
                             "before prepare) and batch.returns (PPO.prepare)")

        def loss_fn(values: torch.Tensor, _: torch.Tensor, mb: TokenBatch
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return algorithm.value_loss(values, mb)

        warmup = self.warming_up
        runs = [self.train_step(batch, loss_fn) for _ in range(self.num_updates)]
        loss = sum(r["vf_loss"] for r in runs) / len(runs)
        clip = sum(r["vf_clip_frac"] for r in runs) / len(runs)
        return critic_metrics(batch, value_loss=loss, clipfrac=clip) | {"warmup": float(warmup)}

    def close(self) -> None:
        """Drop the model and optimizer (idempotent)."""
        for attr in ("optimizer", "scheduler", "module"):
            self.__dict__.pop(attr, None)


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over masked positions (population variances): 1 is a perfect
    critic, 0 no better than a constant, negative worse. ``nan`` when the returns have no
    spread (or fewer than one masked position).

    Example:
        >>> m = torch.tensor([[1.0, 1.0, 0.0]])
        >>> explained_variance(torch.tensor([[0.0, 2.0, 9.0]]), torch.tensor([[1.0, 3.0, 0.0]]), m)
        1.0
        >>> explained_variance(torch.zeros(1, 3), torch.tensor([[1.0, 3.0, 0.0]]), m)
        0.0
    """
    m = mask != 0
    r, v = returns[m].double(), values[m].double()
    var_r = r.var(unbiased=False) if r.numel() else torch.tensor(0.0)
    if r.numel() == 0 or var_r == 0:
        return float("nan")
    return float(1 - (r - v).var(unbiased=False) / var_r)


def critic_metrics(batch: TokenBatch, *, value_loss: float, clipfrac: float) -> dict[str, float]:
    """``value_loss``, ``value_clipfrac``, and from ``batch.values`` (V_old) and
    ``batch.returns`` over generated tokens: ``explained_variance``, ``value_mean``,
    ``return_mean``."""
    assert batch.values is not None and batch.returns is not None
    m = batch.loss_mask != 0
    n = max(int(m.sum()), 1)
    return {"value_loss": value_loss, "value_clipfrac": clipfrac,
            "explained_variance": explained_variance(batch.values, batch.returns, m),
            "value_mean": float(batch.values[m].sum()) / n,
            "return_mean": float(batch.returns[m].sum()) / n}


def build_critic(name: str, spec: CriticSpec, policy: Any, model: nn.Module) -> CriticEngine:
    """Policy ``name``'s critic: ``spec.model`` loaded like the policy's model, else a copy of
    ``model`` (the policy's weights now: after the warm start).

    Raises:
        ConfigError: ``spec.model`` has another vocabulary than the policy, or the backend has
            no critic.
    """
    backend = spec.backend_for(policy.backend)
    base = model if spec.model is None else policy.load(spec.model)[0]
    if base.get_input_embeddings().weight.shape[0] != model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(f"policies.{name}.critic.model={spec.model!r} has another vocabulary "
                          "than the policy; the critic reads the policy's token ids")
    return CriticEngine(base, backend=backend, lr=spec.lr, max_grad_norm=spec.max_grad_norm,
                        token_budget=spec.token_budget, num_updates=spec.num_updates,
                        warmup_steps=spec.warmup_steps)
