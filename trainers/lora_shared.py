"""One base model on the train side, one LoRA adapter per policy: ``SharedLoRABase``.

A backend engine (``FSDPEngine``, ``ArchonEngine``: any engine with LoRA whose ``train_step``
steps its ``optimizer``/``scheduler`` attributes and whose ``trainable_parameters()`` are the
adapter) is built once over the base model. It holds one *slot* of adapter parameters. Each
policy gets an ``AdapterTrainEngine``: its own adapter values, its own AdamW and LR schedule
over the slot, its own step and version. Before any call the view swaps its values into the
slot (copying the previous owner's out) and points the engine at its optimizer, under one lock,
so two policies never interleave::

    backend engine (base weights once, 1 adapter slot)
      ├─ AdapterTrainEngine "speaker"  values, AdamW, schedule, step, version
      └─ AdapterTrainEngine "listener" values, AdamW, schedule, step, version

A swap copies ``2 x rank x (in + out)`` numbers per adapted layer; optimizer states never move
(each AdamW keys its state by the slot parameters and only its owner steps it).

``export_weights()`` yields the adapter alone under PEFT names, what a ``LocalEngine`` adapter
view loads (``areal_agents.engines.local_adapters``).
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from areal_agents.errors import ConfigError

from .base import LossFn, TokenBatch, TrainEngine

if TYPE_CHECKING:
    from .warm_start import WarmStartPlan

__all__ = ["AdapterTrainEngine", "SharedLoRABase", "embedding_b_init"]


class SharedLoRABase:
    """A LoRA backend engine shared by several adapter policies.

    Args:
        engine: the backend engine, built with ``lora=...`` over the base model.

    Raises:
        ConfigError: the engine has no LoRA parameters (``lora`` was not set).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.slot: dict[str, torch.Tensor] = dict(engine.trainable_parameters())
        if not self.slot or not all("lora_" in n for n in self.slot):
            raise ConfigError("a shared LoRA base needs an engine built with lora=...; its "
                              "trainable parameters are not only LoRA adapters")
        self.lock = threading.RLock()
        self.active: AdapterTrainEngine | None = None
        self.views: dict[str, AdapterTrainEngine] = {}
        self._first = {n: p.detach().clone() for n, p in self.slot.items()}
        for n, t in self._first.items():
            if "lora_embedding_B" in n:
                t.copy_(embedding_b_init(t.shape))
        self._reference: AdapterTrainEngine | None = None

    def adapter(self, name: str, *, lr: float, seed: int = 0) -> AdapterTrainEngine:
        """A new adapter policy ``name``: ``B = 0`` (the base's output) and ``A`` drawn like
        LoRA's initialisation from ``seed`` (the first adapter keeps the engine's own ``A``).

        Raises:
            ConfigError: the name is taken.
        """
        if name in self.views:
            raise ConfigError(f"adapter {name!r} already exists on this base; adapters: "
                              f"{sorted(self.views)}")
        values = {n: t.clone() for n, t in self._first.items()}
        if self.views:
            gen = torch.Generator().manual_seed(seed)
            for n, t in values.items():
                if "lora_A" in n:  # kaiming_uniform(a=sqrt(5)) as nn.Linear/PEFT
                    bound = 1 / math.sqrt(t.shape[1])
                    t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=gen))
        view = AdapterTrainEngine(self, name, values, lr)
        self.views[name] = view
        return view

    def reference(self) -> AdapterTrainEngine:
        """A view with zero adapters, never trained: the base model's log-probs, which are
        every adapter's at initialisation (``B = 0``) -- the KL reference of adapter policies."""
        if self._reference is None:
            zeros = {n: torch.zeros_like(t) for n, t in self._first.items()}
            self._reference = AdapterTrainEngine(self, "<base>", zeros, lr=1.0)
        return self._reference

    def reference_of(self, view: AdapterTrainEngine,
                     values: dict[str, torch.Tensor] | None = None) -> AdapterTrainEngine:
        """A never-trained view holding ``values`` (default: a copy of ``view``'s adapter now):
        the KL reference of an adapter warm-started on its own (its starting point, as a full
        model's reference is its weights after the warm start)."""
        values = view.adapter_state() if values is None else values
        return AdapterTrainEngine(self, f"<{view.name}@start>",
                                  {n: t.detach().clone() for n, t in values.items()}, lr=1.0)

    def release(self) -> None:
        """Copy the slot back into its owner's values and leave the slot ownerless, so the
        next ``activate`` points the engine at that view's optimizer again (call with
        ``lock`` held)."""
        if self.active is not None:
            with torch.no_grad():
                for n, p in self.slot.items():
                    self.active.values[n].copy_(p.detach())
            self.active = None

    def activate(self, view: AdapterTrainEngine) -> None:
        """Make ``view`` the slot's owner (call with ``lock`` held)."""
        if self.active is view:
            return
        with torch.no_grad():
            if self.active is not None:
                for n, p in self.slot.items():
                    self.active.values[n].copy_(p.detach())
            for n, p in self.slot.items():
                p.copy_(view.values[n])
        self.engine.optimizer, self.engine.scheduler = view.optimizer, view.scheduler
        self.engine.step = view.step
        self.active = view


def embedding_b_init(shape: torch.Size | tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """An embedding adapter's starting ``B [dim, r]``: uniform in ``+-1/sqrt(r)`` (as a linear
    layer's ``A`` is drawn over its fan-in), not PEFT's ``N(0, 1)``.

    Why: ``A`` starts at zero, so the first steps move ``A`` by about ``lr`` per entry and a
    token's embedding by ``scaling * B @ dA``; with ``N(0, 1)`` entries that is ~0.3 per step
    at rank 8, lr 5e-3, width 128 -- more than an embedding row's own norm on ``tiny:xs``, and
    Signaling runs diverged (KL 2-6, gradient norms up to 27 within 30 steps).
    """
    bound = 1 / math.sqrt(shape[1])
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(tuple(shape)).uniform_(-bound, bound, generator=gen)


class AdapterTrainEngine(TrainEngine):
    """One adapter policy of a ``SharedLoRABase`` (made by ``SharedLoRABase.adapter``).

    ``trainable_parameters()`` are the shared slot's parameters holding this adapter's values
    (while it owns the slot: read them under ``base.lock`` after ``base.activate(view)``).
    """

    def __init__(self, base: SharedLoRABase, name: str, values: dict[str, torch.Tensor],
                 lr: float) -> None:
        self.base, self.name, self.values = base, name, values
        self.version = 0
        self.step = 0
        self._exported: list[tuple[str, torch.Tensor]] | None = None
        # the engine's own optimizer class and settings (betas, eps, weight decay, fused...),
        # at this policy's lr: an adapter steps exactly as a lone engine would
        self.lr = lr
        self.optimizer, self.scheduler = self._new_optimizer(lr)

    def _new_optimizer(self, lr: float) -> tuple[torch.optim.Optimizer, Any]:
        template = self.base.engine.optimizer
        accepted = inspect.signature(type(template)).parameters
        settings = {k: v for k, v in template.defaults.items() if k in accepted}
        optimizer = type(template)(list(self.base.slot.values()), **{**settings, "lr": lr})
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, list(self.base.engine.scheduler.lr_lambdas))

    def warm_start(self, plan: WarmStartPlan) -> list[float]:
        """SFT this adapter alone (``plan``: its role's demos, ``plan.lr``, a fresh optimizer of
        the engine's kind), the base and every other adapter untouched; then restart its RL
        optimizer and schedule at its own ``lr``, at step 0 and version 0, from the fitted
        values. Returns each SFT step's loss."""
        with self.base.lock:
            self.base.release()
            self.optimizer, self.scheduler = self._new_optimizer(plan.lr)
            try:
                losses = plan.run(self)
            finally:
                self.base.release()
                self.optimizer, self.scheduler = self._new_optimizer(self.lr)
                self.step = 0
            return losses

    # the proximal shortcut (trainers/proximal.py) asks the engine how it computes
    @property
    def mixed_precision(self) -> str:
        return getattr(self.base.engine, "mixed_precision", "fp32")

    @property
    def model(self) -> Any:
        return getattr(self.base.engine, "model", None)

    def forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        with self.base.lock:
            self.base.activate(self)
            return self.base.engine.forward_logprobs(batch)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        with self.base.lock:
            self.base.activate(self)
            out = self.base.engine.train_step(batch, loss_fn)
            self.step = self.base.engine.step
            self._exported = self._export(merge_lora=False, dtype=None)
            return out

    def export_weights(self, merge_lora: bool = False,
                       dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """This adapter's tensors, PEFT-named (``merge_lora=True``: the merged full model).

        The adapter export is taken at the end of each ``train_step`` (in its thread), so a
        weight push on the event loop never waits for another policy's step to free the slot.
        """
        if not merge_lora and dtype is None and self._exported is not None:
            return iter(list(self._exported))
        return iter(self._export(merge_lora=merge_lora, dtype=dtype))

    def _export(self, *, merge_lora: bool, dtype: torch.dtype | None
                ) -> list[tuple[str, torch.Tensor]]:
        with self.base.lock:
            self.base.activate(self)
            return [(n, t.clone()) for n, t in
                    self.base.engine.export_weights(merge_lora=merge_lora, dtype=dtype)]

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.base.slot)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Copies of this adapter's values (slot names)."""
        with self.base.lock:
            self.base.activate(self)
            return {n: p.detach().clone() for n, p in self.base.slot.items()}

    def save(self, path: str) -> None:
        """Write ``adapter.pt`` (values, optimizer, schedule, step) under ``path``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        with self.base.lock:
            state = {"values": self.adapter_state(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "step": self.step}
            torch.save(state, Path(path) / "adapter.pt")

    def load(self, path: str) -> None:
        """Restore what ``save`` wrote."""
        state = torch.load(Path(path) / "adapter.pt", weights_only=True)
        with self.base.lock:
            if self.base.active is self:
                self.base.active = None  # re-copy the values in on the next call
            for n, t in state["values"].items():
                self.values[n].copy_(t)
            self._exported = None
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])

    def close(self) -> None:
        """Drop this view; the last one closes the shared backend engine. Idempotent."""
        with self.base.lock:
            if self.base.views.pop(self.name, None) is not None and not self.base.views:
                self.base.engine.close()
