"""``Policy``: one separately parameterised LLM (trainable or frozen) and how to build it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from areal_agents.gateway.tool_parsing import check_tool_parser

from .backends import check_backend
from .critic import CriticSpec
from .placement import InferencePlacement, TrainPlacement, check_train_placement


@dataclass
class Policy:
    """An LLM that one or several agents act with.

    Args:
        model: ``"tiny:<size>"`` (the offline tiny-model factory, seeded by ``seed`` unless the
            spec says ``:seed=N``), a checkpoint path, a hub id such as ``"Qwen/Qwen3-0.6B"``
            already in the local Hugging Face cache (``areal_agents.models.hub``: never
            downloaded; loaded in float32 on the CPU, see ``areal_agents.models.load``), a
            ``(model, tokenizer)`` pair, or ``None`` with ``endpoint``.
        backend: training backend: ``"fsdp"``, ``"archon"``, ``"megatron"`` or a name added
            with ``areal_agents.trainers.backends.register_backend``.
        lr: learning rate of this policy's own optimizer.
        lora: ``None`` or a dict of LoRA arguments (``{"r": 8, "lora_alpha": 16}``).
        adapter_of: the name of a frozen policy whose model this policy trains a LoRA adapter
            of (``lora`` required; ``model`` is then ignored): several roles over one base
            model, held once on each side (``areal_agents.trainers.lora_policies``).
        frozen: act without training (an opponent, a judge, a fixed partner).
        endpoint: base URL of an external OpenAI-compatible server (``model`` is then the
            served model name, or ``None`` for the server default); always frozen.
        sampling: chat-completion sampling arguments (``temperature``, ``max_tokens``, ...).
        seed: seed of the tiny model's initialisation.
        train_kwargs: extra keyword arguments for the backend's engine (``max_grad_norm``...).
        sft_steps: steps of the format-only SFT warm start (random valid actions; 0 = off).
        sft_lr: learning rate of the warm start.
        sft_target_loss: stop the warm start early once the mean SFT loss of its last
            ``SFT_LOSS_WINDOW`` steps (``trainers.warm_start``) is below this; ``sft_steps``
            is then the maximum. ``None`` (default): run all ``sft_steps``.
        api: ``"chat"`` (chat template) or ``"completions"`` (raw text prompt whose last token
            is the observation's last token: small models condition on it far more easily).
        context: what each turn's prompt holds: ``"full"`` (the episode so far: one merged
            sample per session) or ``"last"`` (only the newest observation, for envs whose
            every observation restates the state, e.g. ``TicTacToe(list_free=True)``: each
            turn is then its own sample, which turn-level credit, ``group_by="turn"``, needs).
        ref_model: the KL reference when the algorithm has ``kl_coef > 0``, in the forms of
            ``model`` (same tokenizer); ``None`` = this policy's initial weights (after the
            warm start).
        algorithm_params: this policy's overrides of the trainer's algorithm fields (e.g.
            ``{"kl_coef": 0.05}`` for one role only); the policy then has its own algorithm
            object (and its own EMA baselines).
        train: where the train engine runs: a ``TrainPlacement`` or a dict of its fields
            (``{"world_size": 2}``: FSDP2 over two worker processes); the default trains in
            the controller's process.
        inference: how the policy is served: an ``InferencePlacement``, a dict of its fields,
            or a kind name (``"vllm"``); the default is an in-process ``LocalEngine``.
        tool_parser: how the gateway reads tool calls from this policy's replies: ``"auto"``
            (the tokenizer's response schema, else the family its vocabulary shows, else
            hermes), ``"hermes"``, ``"llama3_json"``, ``"mistral"``, ``"gpt_oss"`` or
            ``"response_template"`` (see ``areal_agents.gateway.tool_parsing``).
        critic: a learned value model for PPO (``algorithm="ppo"``): a ``CriticSpec`` or a dict
            of its fields (``{"lr": 1e-4}``); ``None`` (default) trains none (PPO then uses
            zero values). See ``areal_agents.trainers.critic``.
        max_staleness: versions this policy's samples may lag at training time; ``None``
            (default) takes the Trainer's ``max_staleness``.
        train_every: this policy trains once per ``train_every`` batches, on all of them
            (``train_every * batch_size`` episodes a step): a 1:k training ratio between
            policies, as in asymmetric self-play. See ``areal_agents.trainers.clocks``.

    Raises:
        ConfigError: unknown backend (a ``ValueError``; lists the registered ones), or a
            ``train``/``inference`` placement the backend cannot run (names the fix), or an
            unknown ``tool_parser`` (lists the choices).
        ValueError: ``endpoint`` with ``frozen=False``, or no model.

    Example:
        >>> Policy(model="tiny:xs", lr=1e-3).trainable
        True
        >>> Policy(endpoint="http://localhost:8000/v1", model="judge", frozen=True).trainable
        False
    """

    model: Any = "tiny:xs"
    backend: str = "fsdp"
    lr: float = 1e-5
    lora: dict[str, Any] | None = None
    adapter_of: str | None = None
    frozen: bool = False
    endpoint: str | None = None
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 1.0, "max_tokens": 16})
    seed: int = 0
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    sft_steps: int = 0
    sft_lr: float = 1e-3
    sft_target_loss: float | None = None
    api: str = "chat"
    context: Literal["full", "last"] = "full"
    ref_model: Any = None
    algorithm_params: dict[str, Any] = field(default_factory=dict)
    train: TrainPlacement = field(default_factory=TrainPlacement)
    inference: InferencePlacement = field(default_factory=InferencePlacement)
    tool_parser: str = "auto"
    max_staleness: int | None = None
    train_every: int = 1
    critic: CriticSpec | None = None

    def __post_init__(self) -> None:
        check_backend(self.backend, "Policy.backend")
        check_tool_parser(self.tool_parser, "Policy.tool_parser")
        self.train = TrainPlacement.of(self.train)
        self.inference = InferencePlacement.of(self.inference)
        self.critic = CriticSpec.of(self.critic, "Policy.critic")
        if self.critic is not None and self.trainable:
            self.critic.check("Policy.critic", self.backend, self.train.distributed)
        check_train_placement(self.backend, self.train,
                              trainable=not self.frozen and self.endpoint is None)
        if self.endpoint is not None and not self.frozen:
            raise ValueError(
                f"Policy(endpoint={self.endpoint!r}) is an external server and cannot be trained;"
                " set frozen=True"
            )
        if self.model is None and self.endpoint is None:
            raise ValueError("Policy needs model= (a 'tiny:<size>', a path or (model, tokenizer))"
                             " or endpoint= for an external server")
        if self.api not in ("chat", "completions"):
            raise ValueError(f"Policy.api={self.api!r}; choose 'chat' or 'completions'")
        if self.context not in ("full", "last"):
            raise ValueError(f"Policy.context={self.context!r}; choose 'full' or 'last'")
        if self.sft_target_loss is not None and not (
                math.isfinite(self.sft_target_loss) and self.sft_target_loss > 0):
            raise ValueError("Policy.sft_target_loss must be a finite loss > 0 (or None: off), "
                             f"got {self.sft_target_loss}")
        if self.lr <= 0:
            raise ValueError(f"Policy.lr must be > 0, got {self.lr}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"Policy.max_staleness must be >= 0 (or None: the Trainer's), got "
                             f"{self.max_staleness}")
        if self.train_every < 1:
            raise ValueError(f"Policy.train_every must be >= 1, got {self.train_every}")

    @property
    def trainable(self) -> bool:
        """Whether the trainer updates this policy's weights."""
        return not self.frozen and self.endpoint is None

    def load(self, model: Any = None) -> tuple[Any, Any]:
        """Build ``(model, tokenizer)`` of ``self.model`` (or of ``model``, given in the same
        forms, e.g. ``self.ref_model``); not for ``endpoint`` policies.

        Raises:
            ValueError: called on an endpoint policy.
        """
        if self.endpoint is not None:
            raise ValueError("an endpoint policy has no local model to load")
        model = self.model if model is None else model
        if isinstance(model, tuple):
            return model
        from areal_agents.models import load, parse_tiny_spec, tiny

        spec = parse_tiny_spec(str(model))
        if spec is not None:
            return tiny(spec[0], seed=spec[1] if "seed=" in str(model) else self.seed)
        return load(model)
