"""``Trainer.setup``: models, train engines, KL references, critics, inference engines, gateway.

Per policy (sorted by name; policies with an ``endpoint`` are served elsewhere): load the model,
and for a trainable one build its train engine -- in this process (after the SFT warm start,
the KL reference and the critic, all from the warm-started weights) or as a worker group whose
ranks do all three -- then serve a copy of the weights on the policy's inference engines.
A worker-group policy served outside this process (``server``, ``vllm``...) and named by a
string is never materialised here: this process loads a skeleton on the meta device (config,
tokenizer), the ranks load the model themselves (``ModelSource``), and rank 0 writes the
weights of the serving directory the replicas load. Last
come the rollout controller, the league and, with ``resume``, the latest checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from areal_agents.rollout import RolloutController

from .affinity import pin_process
from .checkpointing import latest_checkpoint
from .clocks import control_of
from .critic import build_critic
from .lora_policies import prepare_served_base, serving_placement, setup_adapter_policy
from .reference import ReferenceSpec, build_reference
from .serving import build_engines
from .warm_start import (
    Demos,
    collect_demos,
    copy_weights_into,
    parse_shares,
    warm_start_label,
    warm_start_metrics,
    warm_start_plan,
    warm_start_policy,
)
from .weight_push import WeightPush
from .wiring import backend_factory
from .worker_group import ModelSource, WorkerGroupEngine

if TYPE_CHECKING:
    from .policy import Policy
    from .trainer import Trainer

__all__ = ["load_skeleton", "setup_trainer"]


async def setup_trainer(trainer: Trainer) -> None:
    """Build everything ``trainer`` trains and serves with (``Trainer.setup``; not idempotent
    itself: the caller checks ``trainer.gateway``)."""
    if trainer.cpus is not None:  # before any worker or engine thread starts: they inherit it
        pin_process(trainer.cpus, trainer.torch_threads)
    elif trainer.torch_threads:
        torch.set_num_threads(trainer.torch_threads)
    from areal_agents.gateway import Gateway

    random.seed(trainer.seed)
    torch.manual_seed(trainer.seed)
    ckpt = latest_checkpoint(trainer.run_dir) if trainer.resume and trainer.run_dir else None
    trainer.gateway = Gateway()
    trainer._client = trainer.gateway.async_client()
    trainer.rewards.bind(trainer._client)  # admin key: judge calls are not recorded
    demos: Demos | None = None
    if trainer.warm_start and ckpt is None:
        start = int(trainer.warm_start.get("seed", 10_000_000))
        seeds = range(start, start + int(trainer.warm_start.get("episodes", 256)))
        shares = parse_shares(trainer.warm_start.get("shares"), list(trainer.warm_start["players"]))
        with trainer.startup.phase(f"collecting {len(seeds)} warm-start demo episodes"):
            demos = await collect_demos(trainer.make_env, trainer.warm_start["players"], seeds,
                                        min_episodes=trainer.warm_start.get("min_episodes"))
        demos.shares = shares
    used = set(trainer.policy_of.values()) | trainer.rewards.policies
    adapters = {n for n in used if trainer.policies[n].adapter_of is not None}
    used |= {trainer.policies[n].adapter_of for n in adapters}  # a base serves its adapters
    for name in sorted(used - adapters):
        if trainer.policies[name].endpoint is None:
            await _setup_policy(trainer, name, demos, resumed=ckpt is not None)
    for name in sorted(adapters):  # after their bases: lora_policies.py
        await setup_adapter_policy(trainer, name, demos, resumed=ckpt is not None)
    controls = {p: control_of(trainer.policies[p], batch_size=trainer.batch_size,
                              max_staleness=trainer.max_staleness,
                              max_concurrent=trainer.max_concurrent) for p in trainer.trainable}
    trainer.controller = RolloutController(
        trainer._episode, controls, group_size=trainer.group_size, filter_fn=trainer._filter,
        seed=trainer.seed, partial_groups=trainer.partial_groups,
        group_fn=trainer.rewards.on_group if trainer.rewards.group_reward_fns else None)
    await trainer.league.setup(trainer, resumed=ckpt is not None)  # pool members, snapshot 0
    await trainer.launcher.attach(trainer)  # auto-scaling samplers (trainers/ray_launcher.py)
    if ckpt is not None:
        with trainer.startup.phase(f"restoring checkpoint {ckpt}"):
            await trainer.restore_checkpoint(ckpt)


async def _setup_policy(trainer: Trainer, name: str, demos: Demos | None, *,
                        resumed: bool) -> None:
    """Load policy ``name``'s model; build its train side when trainable; serve a copy."""
    from areal_agents.models import eos_token_ids

    policy = trainer.policies[name]
    what = policy.model if isinstance(policy.model, str) else type(policy.model).__name__
    on_ranks = _loaded_on_ranks(policy)
    with trainer.startup.phase(f"loading {'the config' if on_ranks else 'model'} {what} "
                               f"for policy {name}"):
        model, tokenizer = load_skeleton(policy) if on_ranks else policy.load()
    trainer.tokenizers[name] = tokenizer
    serving = None
    if policy.trainable:
        factory = backend_factory(policy.backend)
        reference = (ReferenceSpec.of(name, policy, trainer.run_dir, resumed)
                     if getattr(trainer.algorithms[name], "needs_reference", False) else None)
        if policy.train.distributed:  # the ranks warm start and hold the reference
            with trainer.startup.phase(f"starting the training worker group of {name}"):
                source = ModelSource(str(policy.model), policy.seed) if on_ranks else model
                trainer.train_engines[name] = await _worker_group(
                    trainer, name, source, tokenizer, factory, demos, reference)
            serving = model
        else:
            if policy.sft_steps and demos is not None:
                label = warm_start_label(policy.sft_steps, policy.sft_target_loss)
                with trainer.startup.phase(f"SFT warm start of {name} ({label})"):
                    transcripts = demos.of_agents_of(trainer.policy_of, {name})
                    losses = await warm_start_policy(policy, model, tokenizer, factory,
                                                     transcripts, trainer.seed, demos.shares)
                    _log_warm_start(trainer, name, demos, losses)
            if reference is not None:
                trainer.ref_engines[name] = build_reference(
                    name, policy, model, factory, trainer.run_dir, resumed=resumed)
            if policy.critic is not None:  # from the weights after the warm start
                trainer.critics[name] = build_critic(name, policy.critic, policy, model)
            # copied before the engine is built: PEFT LoRA rewraps `model` in place,
            # and the served copy must keep the plain HF names export_weights yields
            serving = copy.deepcopy(model)
            with trainer.startup.phase(f"building the {policy.backend} train engine of {name}"):
                trainer.train_engines[name] = factory(model, lr=policy.lr, lora=policy.lora,
                                                      **policy.train_kwargs)
    serving = (copy.deepcopy(model) if serving is None else serving).eval()
    if policy.trainable:
        weights_dir = trainer.run_dir / "weights" / name if trainer.run_dir else None
        trainer.weight_pushes[name] = WeightPush(policy.inference, weights_dir)
    write_model = (functools.partial(_write_from_rank0, trainer.train_engines[name], serving,
                                     policy.inference.bucket_bytes) if on_ranks else None)
    placement = serving_placement(trainer.policies, name)  # + LoRA args for a vLLM base
    await prepare_served_base(trainer, name, serving, demos, resumed=resumed)  # vLLM base
    with trainer.startup.phase(f"building the inference engines of {name}"):
        engines = await trainer.launcher.build_engines(  # None: built as without a launcher
            name, placement, serving, tokenizer, trainer.run_dir,
            trainer.generation_batch_size, write_model=write_model) or await build_engines(
            name, placement, serving, tokenizer, trainer.run_dir,
            max_batch_size=trainer.generation_batch_size, write_model=write_model)
    trainer.gateway.add_policy(name, engines, tokenizer, tool_parser=policy.tool_parser,
                               stop_token_ids=eos_token_ids(serving, tokenizer))


def _loaded_on_ranks(policy: Policy) -> bool:
    """Whether only the ranks hold the model: a worker-group policy served outside this
    process, given by name (a tiny spec, a directory, a hub id), not as an object."""
    return (policy.trainable and policy.train.distributed and isinstance(policy.model, str)
            and policy.inference.kind != "in_process")


def load_skeleton(policy: Policy) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``policy.model`` with every parameter on the meta device
    (config, generation config and structure; no memory): what the controller keeps of a
    model that only its worker group's ranks load.

    Example:
        >>> from areal_agents.trainers.policy import Policy
        >>> model, tokenizer = load_skeleton(Policy(model="tiny:xs"))
        >>> {p.device.type for p in model.parameters()}, model.config.model_type
        ({'meta'}, 'qwen3')
    """
    from areal_agents.models import parse_tiny_spec
    from areal_agents.models.loading import resolve_checkpoint

    if parse_tiny_spec(str(policy.model)) is not None:
        with torch.device("meta"):
            return policy.load()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = resolve_checkpoint(policy.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    with contextlib.suppress(OSError):  # no generation_config.json: the config's defaults
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _write_from_rank0(engine: WorkerGroupEngine, skeleton: Any, bucket_bytes: int,
                      directory: Path) -> None:
    """The serving directory of a model only the ranks hold: rank 0 writes the weights (a
    safetensors dir of ``bucket_bytes`` shards), then this process adds the configs."""
    engine.write_weights(str(directory), bucket_bytes)
    skeleton.config.save_pretrained(directory)
    if getattr(skeleton, "generation_config", None) is not None:
        skeleton.generation_config.save_pretrained(directory)


async def _worker_group(trainer: Trainer, name: str, model: Any, tokenizer: Any, factory: Any,
                        demos: Demos | None, reference: ReferenceSpec | None
                        ) -> WorkerGroupEngine:
    """Policy ``name``'s worker group; its ranks run the warm start and hold the KL
    reference (nothing of either in this process). The warm-started weights then stream
    from rank 0 into ``model``, the copy the inference engines are built from (unless
    ``model`` is a ``ModelSource``: then only the ranks ever hold the weights)."""
    policy = trainer.policies[name]
    demos = demos if policy.sft_steps else None
    plan = (None if demos is None else
            warm_start_plan(policy, tokenizer, demos.of_agents_of(trainer.policy_of, {name}),
                            trainer.seed, demos.shares))
    group = trainer.launcher.group_factory(name, policy.train)  # None: local processes
    engine = await asyncio.to_thread(  # the workers unpickle their own copies of `model`
        WorkerGroupEngine, model, policy.train, backend=policy.backend, factory=factory,
        lr=policy.lr, lora=policy.lora, warm_start=plan, reference=reference, group=group,
        **policy.train_kwargs)
    if engine.reference is not None:
        trainer.ref_engines[name] = engine.reference
    if demos is not None:
        _log_warm_start(trainer, name, demos, engine.warm_start_losses)
    if plan is not None and not isinstance(model, ModelSource):
        copy_weights_into(model, engine.export_weights())
    return engine


def _log_warm_start(trainer: Trainer, name: str, demos: Demos, losses: list[float]) -> None:
    metrics = {f"warm_start/{name}/failed_episodes": float(demos.num_failed)}
    metrics.update(warm_start_metrics(name, losses))
    trainer.logger.log(0, metrics)
