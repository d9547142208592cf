"""Typed run configs: pydantic models mirroring ``Trainer``'s keyword arguments.

Load YAML with ``key.sub=value`` overrides (values parsed as YAML scalars)::

    cfg = load_config("examples/signaling/two_llms.yaml", ["trainer.batch_size=64"])
    trainer = cfg.build()

Validation errors are ``ConfigError`` naming the field and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .trainers.placement import InferencePlacement, TrainPlacement, check_train_placement


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyConfig(_Strict):
    """One LLM (see ``areal_agents.Policy``)."""

    model: str | None = Field("tiny:xs", description="'tiny:<size>[:seed=N]', a checkpoint path, "
                              "a hub id in the local HF cache ('Qwen/Qwen3-0.6B'; never "
                              "downloaded), or the served model name with endpoint")
    backend: str = Field("fsdp", description="training backend: fsdp, archon, megatron or one "
                         "added with areal_agents.trainers.backends.register_backend")
    lr: float = Field(1e-5, gt=0, description="learning rate of this policy's optimizer")
    lora: dict[str, Any] | None = Field(None, description="LoRA arguments, e.g. {r: 8}")
    adapter_of: str | None = Field(
        None, description="a frozen policy whose model this one trains a LoRA adapter of (lora "
        "required; one base in memory per side: areal_agents.trainers.lora_policies)")
    frozen: bool = Field(False, description="act without training")
    endpoint: str | None = Field(None, description="external OpenAI-compatible base URL (frozen)")
    sampling: dict[str, Any] = Field(default_factory=lambda: {"temperature": 1.0, "max_tokens": 16},
                                     description="chat-completion sampling arguments")
    seed: int = Field(0, description="tiny-model initialisation seed")
    train_kwargs: dict[str, Any] = Field(default_factory=dict,
                                         description="extra backend engine arguments")
    sft_steps: int = Field(0, ge=0, description="format-only SFT warm-start steps")
    sft_lr: float = Field(1e-3, gt=0, description="warm-start learning rate")
    sft_target_loss: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="stop the warm start once the mean SFT "
        "loss of its last 10 steps is below this (sft_steps is then the maximum); None: off")
    api: Literal["chat", "completions"] = Field(
        "chat", description="chat template, or raw-text prompts ending in the observation")
    context: Literal["full", "last"] = Field(
        "full", description="each turn's prompt: the episode so far, or only the newest "
        "observation (each turn its own sample; for group_by: turn)")
    ref_model: str | None = Field(
        None, description="KL reference (kl_coef > 0) as 'tiny:<size>[:seed=N]' or a path; "
        "None: the policy's initial weights after the warm start")
    algorithm_params: dict[str, Any] = Field(
        default_factory=dict, description="this policy's overrides of algorithm.params (e.g. "
        "{kl_coef: 0.05} for one role only)")
    train: TrainPlacement = Field(
        default_factory=TrainPlacement, description="where the train engine runs: {world_size, "
        "dp, tp, pp, ep, device, threads, workers, cpus}; world_size 1 (default) trains in "
        "this process")
    inference: InferencePlacement = Field(
        default_factory=InferencePlacement, description="how the policy is served: a kind "
        "(in_process, server, vllm, sglang) or {kind, replicas, device, transport, server_args, "
        "python, urls, shared_head_tokens}")
    tool_parser: str = Field(
        "auto", description="how tool calls are read from replies: auto, hermes, llama3_json, "
        "mistral, gpt_oss or response_template (areal_agents.gateway.tool_parsing)")
    max_staleness: int | None = Field(None, ge=0, description="versions this policy's samples "
                                      "may lag (None: trainer.max_staleness)")
    train_every: int = Field(1, ge=1, description="train once per k batches, on all k (a 1:k "
                             "training ratio; areal_agents.trainers.clocks)")
    critic: dict[str, Any] | None = Field(
        None, description="a learned value model for algorithm ppo: {lr, model, backend, "
        "max_grad_norm, token_budget, num_updates} (areal_agents.trainers.critic.CriticSpec); "
        "None: no critic")

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, value: str) -> str:
        from areal_agents.trainers.backends import check_backend

        return check_backend(value)

    @field_validator("tool_parser")
    @classmethod
    def _known_tool_parser(cls, value: str) -> str:
        from areal_agents.gateway.tool_parsing import check_tool_parser

        return check_tool_parser(value)

    @field_validator("critic")
    @classmethod
    def _critic_spec(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from areal_agents.trainers.critic import CriticSpec

        CriticSpec.of(value, "critic")  # unknown fields and bad values fail here, by name
        return value

    @field_validator("train", mode="before")
    @classmethod
    def _train_placement(cls, value: Any) -> TrainPlacement:
        return TrainPlacement.of(value)  # unknown fields are errors, as everywhere in the config

    @field_validator("inference", mode="before")
    @classmethod
    def _inference_placement(cls, value: Any) -> InferencePlacement:
        return InferencePlacement.of(value)  # "vllm" is InferencePlacement(kind="vllm")

    @model_validator(mode="after")
    def _placement_fits_backend(self) -> PolicyConfig:
        check_train_placement(self.backend, self.train,
                              trainable=not self.frozen and self.endpoint is None)
        return self


class AlgorithmConfig(_Strict):
    """The RL algorithm: a name plus the object's fields (``clip_eps``, ``kl_coef``...)."""

    name: str = Field("grpo", description="algorithm object: a name in "
                      "areal_agents.algorithms.ALGORITHMS (grpo, dapo, ppo, cispo...)")
    params: dict[str, Any] = Field(default_factory=dict, description="fields of the object")

    @field_validator("name")
    @classmethod
    def _registered_algorithm(cls, value: str) -> str:
        from areal_agents.algorithms.registry import check_algorithm

        return check_algorithm(value)


class TrainerConfig(_Strict):
    """Rollout and loop settings (see ``areal_agents.Trainer``)."""

    batch_size: int = Field(32, ge=1, description="episodes per train step per policy")
    group_size: int = Field(16, ge=1, description="episodes per task seed (GRPO group)")
    max_staleness: int = Field(0, ge=0, description="versions a sample may lag (0: synchronous)")
    max_concurrent: int | None = Field(None, ge=1, description="episodes in flight at most")
    steps: int = Field(100, ge=1, description="train steps of `train`")
    eval_every: int = Field(0, ge=0, description="greedy eval every k steps (0: never)")
    eval_seeds: list[int] = Field(default_factory=lambda: list(range(1_000_000, 1_000_064)),
                                  description="held-out task seeds")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every k steps (0: only the "
                                  "final weights, which every run saves)")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep the newest k "
                                         "checkpoints (None: all)")
    seed: int = Field(0, description="first task seed and RNG seed")
    torch_threads: int | None = Field(1, ge=1, description="torch.set_num_threads")
    cpus: list[int] | None = Field(None, description="pin the controller process to these CPU "
                                   "ids (Linux); train workers: policies.<p>.train.cpus")
    warm_start: dict[str, Any] | None = Field(
        None, description="{episodes: n, players: {agent: 'random' | player}, min_episodes: k}; "
        "failed demo episodes are skipped, fewer than k (default n/2) finished is an error")
    max_steps_per_episode: int | None = Field(None, ge=1, description="episode step cap")
    generation_batch_size: int | None = Field(
        None, ge=1, description="rows per inference batch (default max(32, max_concurrent)); 1 "
        "makes generation bitwise reproducible")
    clock: Literal["lockstep", "independent"] = Field(
        "lockstep", description="lockstep: each step trains every due policy together; "
        "independent: each policy trains when its own batch is ready, and steps count policy "
        "steps (areal_agents.trainers.clocks)")
    partial_groups: int = Field(0, ge=0, description="0: train whole groups only; k >= 1: train "
                                "a group with its >= k finished members when its stragglers "
                                "would make it too stale (throughput vs a bias to short outputs)")
    record_samples: int = Field(2, ge=0, description="trained samples kept per policy per step "
                                "in run_dir/samples for `areal-agents view RUN_DIR` (0: off)")
    session_idle_timeout_s: float | None = Field(
        None, gt=0, description="`serve --train`: a session no request used for this long is "
        "ended by the gateway, its key revoked, and counted abandoned (None: never)")
    external_batch_size: int | None = Field(
        None, ge=1, description="`serve --train`: a mixed run: this many episodes of each "
        "trainable policy's batch are sessions of external agents, the rest env episodes "
        "(a multiple of group_size, below batch_size); None: every episode is external")


class LoggingConfig(_Strict):
    """Where metrics go."""

    tensorboard: bool = Field(True, description="also write TensorBoard events to run_dir/tb")
    wandb_project: str | None = Field(None, description="W&B project: also log to Weights & "
                                      "Biases (needs `pip install wandb`); None = off")
    wandb_name: str | None = Field(None, description="W&B run name (default: run_dir's name)")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user)")
    progress: bool = Field(True, description="show the rich progress bar")


class OpponentPoolConfig(_Strict):
    """The opponent pool (``areal_agents.league.OpponentPool``; one field per argument)."""

    members: list[str] = Field(default_factory=list, description="scripted player names "
                               "(heuristic, random...) and names of frozen policies")
    seat: str = Field("any", description="the opponent's agent id, or 'any' (drawn per seed)")
    snapshot_every: int = Field(0, ge=0, description="snapshot every k policy steps (0: none)")
    snapshot_of: str | list[str] | None = Field(None, description="policies to snapshot "
                                                "(default: those of the opponent's seats)")
    max_snapshots: int = Field(8, ge=1, description="snapshots kept per policy")
    sampling: Literal["uniform", "latest", "pfsp"] = Field("uniform", description="member draw")
    latest_share: float = Field(0.5, gt=0, le=1, description="'latest': the newest's share")
    pfsp_power: float = Field(2.0, gt=0, description="'pfsp': weight p_loss ** power + 0.05")
    decay: float = Field(0.98, gt=0, le=1, description="decay of PFSP counts per game")
    league_every: int = Field(0, ge=0, description="league evaluation every k steps, inside "
                              "the trainer's evaluation (0: never)")
    league_seeds: list[int] = Field(default_factory=lambda: list(range(2_000_000, 2_000_016)),
                                    description="held-out seeds of each league pairing")


class RunConfig(_Strict):
    """A whole training run."""

    env: str = Field(..., description="registered env id, e.g. Signaling-v0")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="arguments of make()")
    policies: dict[str, PolicyConfig] = Field(..., description="policy name -> policy")
    policy_map: dict[str, str] = Field(..., description="agent id -> policy name")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    opponents: OpponentPoolConfig | None = Field(None, description="an opponent pool: each "
                                                 "episode one member takes the opponent's seat")
    reward_fns: list[dict[str, Any]] = Field(
        default_factory=list, description="extra rewards: [{type: rubric_judge | "
        "reference_judge | group_judge | reward_model | 'module:attr', <its arguments>}] "
        "(areal_agents.rewards.from_config); a judge's policy names one of `policies`")
    reward_levels: dict[str, dict[str, float]] | None = Field(
        None, description="per agent id, weights of the env's reward levels {process, agent, "
        "team} (a level left out weighs 1); None: the env's scalar reward "
        "(areal_agents.algorithms.reward_levels)")
    run_dir: str = Field("runs/run", description="metrics, plots and checkpoints")
    launcher: Literal["local", "ray"] | dict[str, Any] = Field(
        "local", description="where worker groups and engine servers run: local (this "
        "machine), ray, or {kind: ray, address (auto | host:port | null: a local instance), "
        "num_cpus, num_gpus, cpus_per_worker, autoscale: {policy: {min_replicas, max_replicas, "
        "metric: queue | latency, scale_up_queue, scale_down_queue, scale_up_latency_s, "
        "scale_down_latency_s, latency_quantile, latency_window_s, ...}}} "
        "(areal_agents.trainers.ray_launcher, trainers/autoscale.py)")
    resume: bool = Field(False, description="continue from run_dir's latest checkpoint (a fresh "
                         "run when there is none); same as `train --resume`")

    @model_validator(mode="after")
    def _reward_fns_known(self) -> RunConfig:
        from .rewards.from_config import check_reward_spec

        for i, spec in enumerate(self.reward_fns):
            try:
                check_reward_spec(spec, list(self.policies))
            except ValueError as exc:
                raise ValueError(f"reward_fns[{i}]: {exc}") from None
        return self

    def build(self, resume: bool = False, trainer_cls: type | None = None) -> Any:
        """The ``Trainer`` this config describes (``resume`` or ``self.resume`` continues from
        ``run_dir``'s latest checkpoint); ``trainer_cls`` builds a subclass instead (e.g.
        ``ExternalTrainer`` for ``serve --train``)."""
        from areal_agents.league import OpponentPool
        from areal_agents.metrics import make_logger
        from areal_agents.rewards.from_config import build_reward_fns
        from areal_agents.trainers.policy import Policy
        from areal_agents.trainers.stats import resolve_algorithm
        from areal_agents.trainers.trainer import Trainer

        t = self.trainer
        reward_fns, group_reward_fns = build_reward_fns(self.reward_fns)
        return (trainer_cls or Trainer)(
            env=self.env, env_kwargs=self.env_kwargs,
            policies={n: Policy(**p.model_dump()) for n, p in self.policies.items()},
            policy_map=self.policy_map,
            algorithm=resolve_algorithm(self.algorithm.name, **self.algorithm.params),
            batch_size=t.batch_size, group_size=t.group_size, max_staleness=t.max_staleness,
            max_concurrent=t.max_concurrent, eval_every=t.eval_every, eval_seeds=t.eval_seeds,
            checkpoint_every=t.checkpoint_every, run_dir=self.run_dir,
            resume=resume or self.resume, seed=t.seed,
            warm_start=t.warm_start, torch_threads=t.torch_threads, cpus=t.cpus,
            max_steps_per_episode=t.max_steps_per_episode, progress=self.logging.progress,
            generation_batch_size=t.generation_batch_size, record_samples=t.record_samples,
            partial_groups=t.partial_groups, clock=t.clock,
            keep_checkpoints=t.keep_checkpoints, reward_fns=reward_fns,
            group_reward_fns=group_reward_fns, reward_levels=self.reward_levels,
            launcher=self.launcher,
            opponents=None if self.opponents is None else OpponentPool(
                **self.opponents.model_dump()),
            logger=make_logger(self.run_dir, tensorboard=self.logging.tensorboard,
                               wandb_project=self.logging.wandb_project,
                               wandb_name=self.logging.wandb_name,
                               wandb_entity=self.logging.wandb_entity,
                               config=self.model_dump()),
        )  # fmt: skip


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries in nested dict ``data`` (values parsed as YAML).

    Raises:
        ConfigError: an override without ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(x) for x in err["loc"])
        allowed = err.get("ctx", {}).get("expected")
        hint = f" (allowed: {allowed})" if allowed else ""
        if err["type"] == "extra_forbidden":
            hint = " (unknown field; check its spelling)"
        lines.append(f"{field}: {err['msg']}{hint}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_config(data: dict[str, Any]) -> RunConfig:
    """Validate a config dict.

    Raises:
        ConfigError: a field is missing or invalid (names the field and allowed values).
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML ``path``, apply ``key.sub=value`` overrides, validate.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: invalid YAML (one line: the file, line, column and problem) or fields.
    """
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return parse_config(apply_overrides(data, list(overrides or [])))
