"""Adapter policies: ``Policy(adapter_of="base", lora={...})`` -- one LoRA adapter of another
(frozen) policy's model per role, the base weights once in memory on each side.

::

    policies:
      base:     {model: "tiny:s", frozen: true}        # served as itself, never trained
      speaker:  {adapter_of: base, lora: {r: 8}, lr: 1e-3}
      listener: {adapter_of: base, lora: {r: 8}, lr: 3e-3, max_staleness: 2}

Train side: one backend engine (``Policy.backend``: fsdp or archon) over a copy of the base,
shared by the adapter policies through ``trainers/lora_shared.py`` (each its own optimizer,
schedule, version; its own staleness bound and ``algorithm_params`` as any policy). Serving
side: the base policy's ``LocalEngine`` replicas serve every adapter in the same batch
(``areal_agents.engines.lora``); a weight push ships only the adapter and pauses only its
requests. Or the base is served by vLLM (``inference: {kind: vllm, ...}``): its servers are
launched with ``--enable-lora`` for its adapters (``vllm_lora_args``) and each adapter is a
vLLM multi-LoRA adapter (``engines/vllm_lora.py``: an update loads in place and pauses
nothing); its shared warm start is fitted before the servers load it (``prepare_served_base``).

Rules checked by ``check_adapter_policies`` (``ConfigError`` naming the fix): the base exists,
is a plain local policy (not an adapter, not an endpoint) and is ``frozen``, served in process
or by vLLM (``ADAPTER_SERVING``); an adapter policy
has ``lora``, trains in-process (no ``train`` placement) and leaves ``inference`` at its
default (it rides on the base's); all adapters of one base share ``backend``, ``lora`` and
``train_kwargs`` (one engine, one adapter shape), and have no ``critic`` or ``ref_model``.

Warm start (``trainer.warm_start``), in two optional stages: the base's ``sft_steps`` fit the
shared base on the transcripts of every agent its adapters play (each batch mixing them as
``trainer.warm_start.shares`` says, alike by default), before any adapter attaches (a base
with tied embeddings is untied first, ``untie_embeddings``); then each adapter policy's own
``sft_steps`` (at its ``sft_lr``) fit *its adapter alone* on its own agents' transcripts,
the base frozen and the other adapters untouched
(``AdapterTrainEngine.warm_start``). An adapter's KL reference is where it starts RL: the base
(a zero adapter) without its own warm start, else a frozen copy of its fitted adapter (saved
to ``checkpoints/reference/<name>.pt``, loaded on resume).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from areal_agents.engines.base import WeightUpdate
from areal_agents.errors import ConfigError

from .lora_shared import AdapterTrainEngine, SharedLoRABase
from .placement import InferencePlacement, TrainPlacement
from .warm_start import (
    copy_weights_into,
    warm_start_label,
    warm_start_metrics,
    warm_start_plan,
    warm_start_policy,
)
from .weight_push import WeightPush
from .wiring import backend_factory

if TYPE_CHECKING:
    from .policy import Policy
    from .trainer import Trainer
    from .warm_start import Demos

__all__ = ["adapter_bases", "check_adapter_policies", "prepare_served_base", "serving_placement",
           "setup_adapter_policy", "untie_embeddings"]

ADAPTER_SERVING = ("in_process", "vllm")
"""Inference kinds of a base that serve its adapters: ``LocalEngine`` replicas (every adapter in
one continuous batch) or vLLM servers (multi-LoRA, ``engines/vllm_lora.py``)."""


def adapter_bases(policies: dict[str, Policy]) -> dict[str, list[str]]:
    """``{base: [adapter policies]}`` (sorted)."""
    out: dict[str, list[str]] = {}
    for name in sorted(policies):
        base = policies[name].adapter_of
        if base is not None:
            out.setdefault(base, []).append(name)
    return out


def check_adapter_policies(policies: dict[str, Policy]) -> None:
    """Validate every ``adapter_of`` (see the module docstring).

    Raises:
        ConfigError: the first broken rule, naming the policy and the fix.
    """
    for base, adapters in adapter_bases(policies).items():
        if base not in policies:
            raise ConfigError(f"Policy {adapters[0]!r} has adapter_of={base!r}, but there is no "
                              f"policy {base!r}; policies: {sorted(policies)}")
        bp = policies[base]
        if bp.adapter_of is not None or bp.endpoint is not None:
            raise ConfigError(f"adapter_of={base!r}: {base!r} must be a local model, not an "
                              "adapter or an endpoint; point adapter_of at the base model's policy")
        if not bp.frozen:
            raise ConfigError(f"{base!r} is the base of LoRA adapters {adapters} and must not "
                              f"train under them; set frozen=True on policy {base!r}")
        if bp.inference.kind not in ADAPTER_SERVING:
            raise ConfigError(f"adapters of {base!r} are served by its engines, in-process "
                              f"LocalEngines or vLLM servers (multi-LoRA); {base!r} has "
                              f"inference kind {bp.inference.kind!r}: use 'in_process' or 'vllm'")
        for name in adapters:
            _check_one(name, policies[name])
        first = policies[adapters[0]]
        for name in adapters[1:]:
            p = policies[name]
            for attr in ("backend", "lora", "train_kwargs"):
                if getattr(p, attr) != getattr(first, attr):
                    raise ConfigError(
                        f"adapters of {base!r} share one train engine, so {attr} must be equal: "
                        f"{adapters[0]!r} has {getattr(first, attr)!r}, {name!r} has "
                        f"{getattr(p, attr)!r}")
        if bp.inference.kind == "vllm":
            _check_vllm_base(base, policies)


def _check_vllm_base(base: str, policies: dict[str, Policy]) -> None:
    """A vLLM-served base: no shared warm start on servers it attaches to (``urls``), and LoRA
    ``server_args`` (where the user sets them) large enough for its adapters."""
    bp = policies[base]
    if bp.sft_steps and bp.inference.urls:
        raise ConfigError(
            f"{base!r} is served by running vLLM servers (urls), so it cannot take sft_steps: "
            "the shared warm start fits the base before its servers load it. Drop urls (the "
            "trainer launches them) or sft_steps")
    wanted = vllm_lora_args(policies, base)
    for key, need in wanted.items():
        have = bp.inference.server_args.get(key)
        if have is not None and int(have) < need:
            raise ConfigError(f"{base!r} serves {wanted['max_loras']} adapters of rank "
                              f"{wanted['max_lora_rank']} on vLLM, but its server_args set "
                              f"{key}={have}; raise it to {need} or drop it (set automatically)")


def vllm_lora_args(policies: dict[str, Policy], base: str) -> dict[str, int]:
    """``VLLMEngine.launch`` arguments that serve every adapter of ``base`` at once:
    ``max_loras`` (their number) and ``max_lora_rank`` (their rank; adapters of one base share
    ``lora``)."""
    adapters = adapter_bases(policies)[base]
    rank, _ = adapter_shape(policies[adapters[0]])
    return {"max_loras": len(adapters), "max_lora_rank": rank}


def serving_placement(policies: dict[str, Policy], name: str) -> InferencePlacement:
    """Policy ``name``'s inference placement as its engines are built: a vLLM-launched base of
    adapters gets ``vllm_lora_args`` under its own ``server_args`` (the user's win)."""
    placement = policies[name].inference
    if (placement.kind != "vllm" or placement.urls
            or name not in adapter_bases(policies)):
        return placement
    args = {**vllm_lora_args(policies, name), **placement.server_args}
    return dataclasses.replace(placement, server_args=args)


def _check_one(name: str, p: Policy) -> None:
    where = f"Policy {name!r} (adapter_of={p.adapter_of!r})"
    if p.lora is None:
        raise ConfigError(f"{where} needs lora=, e.g. {{'r': 8, 'lora_alpha': 16, "
                          "'target_modules': ['q_proj', 'v_proj']}")
    if p.frozen:
        raise ConfigError(f"{where} is frozen: a frozen adapter is the base itself; use the "
                          "base policy or set frozen=False")
    if p.train != TrainPlacement():
        raise ConfigError(f"{where} trains in the controller's process; drop train=")
    if p.inference != InferencePlacement():
        raise ConfigError(f"{where} is served by its base's engines; drop inference=")
    targets = (p.lora or {}).get("target_modules") or []
    if p.backend != "fsdp" and any(fnmatch.fnmatchcase("embed_tokens", str(t)) for t in targets):
        raise ConfigError(f"{where}: LoRA on embed_tokens is supported on the fsdp backend only "
                          f"(backend {p.backend!r} adapts linear layers); use backend='fsdp' or "
                          "drop embed_tokens from target_modules")
    for attr, off in (("critic", None), ("ref_model", None)):
        if getattr(p, attr) != off:
            raise ConfigError(f"{where}: {attr} is not supported for adapter policies yet; "
                              f"drop {attr}= (or use a full-model policy)")


def adapter_shape(policy: Policy) -> tuple[int, float]:
    """``(rank, alpha)`` of ``policy.lora`` with the backend's defaults (PEFT's for fsdp)."""
    lora = dict(policy.lora or {})
    if lora.get("use_rslora"):
        raise ConfigError("use_rslora is not supported for adapter policies; drop it")
    if policy.backend == "fsdp":
        from peft import LoraConfig

        cfg = LoraConfig(task_type="CAUSAL_LM", **lora)
        return int(cfg.r), float(cfg.lora_alpha)
    from .archon.lora import lora_config

    acfg = lora_config(lora)
    return acfg.rank, acfg.alpha


async def setup_adapter_policy(trainer: Trainer, name: str, demos: Demos | None = None, *,
                               resumed: bool = False) -> None:
    """Build adapter policy ``name``: its view of the base's shared train engine (built by the
    first adapter, from a copy of the base's served model, after the base's warm start when
    it has ``sft_steps``), its own warm start when it has ``sft_steps``, and an adapter on
    each of the base's replicas (``LocalEngine``s or vLLM servers). Its KL reference is its
    starting point (the module docstring). The base must be set up."""
    policy = trainer.policies[name]
    base = policy.adapter_of
    replicas = trainer.gateway.policies[base].router.engines
    in_process = _in_process(base, replicas)
    shared: dict[str, SharedLoRABase] = trainer.lora_bases
    if base not in shared and not in_process:  # fitted before its servers loaded it; the
        served = trainer.served_bases.pop(base)  # train engine takes it (held once here)
    elif base not in shared:
        served = replicas[0].model  # the base weights, as served
        if resumed:
            await _restore_base(trainer, base, replicas)
        elif trainer.policies[base].sft_steps and demos is not None:
            for replica in replicas:  # before the shared warm start (see untie_embeddings)
                untie_embeddings(replica.model)
            model = _plain_copy(served)
            await _fit_base(trainer, base, model, demos)
            for replica in replicas:  # version 0 still: the policy's starting point
                await replica.update_weights(WeightUpdate(
                    named_tensors=model.state_dict().items(), version=0))
            _save_base(trainer, base, served)
    if base not in shared:
        with trainer.startup.phase(f"building the shared {policy.backend} LoRA engine of "
                                   f"{base}"):
            engine = backend_factory(policy.backend)(
                _plain_copy(served) if in_process else served, lr=policy.lr,
                lora=policy.lora, **policy.train_kwargs)
        shared[base] = SharedLoRABase(engine)
    view = shared[base].adapter(name, lr=policy.lr, seed=policy.seed + len(shared[base].views))
    trainer.train_engines[name] = view
    if policy.sft_steps and demos is not None:
        await _warm_start_adapter(trainer, name, view, demos)
    if getattr(trainer.algorithms[name], "needs_reference", False):
        trainer.ref_engines[name] = (
            _own_reference(trainer, name, shared[base], view, resumed) if policy.sft_steps
            else shared[base].reference())
    trainer.tokenizers[name] = tokenizer = trainer.tokenizers[base]
    trainer.weight_pushes[name] = WeightPush(policy.inference, None)
    targets = sorted({n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                      for n, _ in view.export_weights()})
    rank, alpha = adapter_shape(policy)
    engines = []
    for replica in replicas:
        engines.append(replica.add_adapter(name, rank=rank, alpha=alpha, target_modules=targets))
        await engines[-1].update_weights(_first_update(view))
    trainer.gateway.add_policy(name, engines, tokenizer, tool_parser=policy.tool_parser,
                               stop_token_ids=trainer.gateway.policies[base].stop_ids)


def _in_process(base: str, replicas: list[Any]) -> bool:
    """Whether the base's replicas are ``LocalEngine``s (else vLLM servers).

    Raises:
        ConfigError: replicas of another kind (e.g. a base attached by its own launcher).
    """
    from areal_agents.engines.local import LocalEngine
    from areal_agents.engines.vllm import VLLMEngine

    if all(isinstance(e, LocalEngine) for e in replicas):
        return True
    if all(isinstance(e, VLLMEngine) for e in replicas):
        return False
    raise ConfigError(f"adapters of {base!r} need its replicas to be LocalEngines or vLLM "
                      f"servers, not {sorted({type(e).__name__ for e in replicas})}")


def untie_embeddings(model: Any) -> bool:
    """Give a model with tied input/output embeddings its own output head, a copy of the
    embedding (same outputs); returns whether it was tied.

    Why: the shared warm start fits every role's replies at once. With a tied head, fitting
    the listener's uniform picks among the items A-D pulls the rows of A-D together, and
    those rows are also the speaker's *input* embedding of its target: after 60 steps on
    ``tiny:xs`` their mean pairwise cosine went 0.05 -> 0.88 and the speaker's last hidden
    state became the same for every target (cosine 0.9999), so no adapter on the linear
    layers could learn a code. Untied (the head trained, the input rows left to the input
    side) they stay apart (0.23; docs/multi_agent_training.md, round 5). Costs one
    ``vocab x hidden`` matrix, once per side (the base is frozen after its warm start).
    """
    from torch import nn

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(),
                               requires_grad=embedding.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return True


async def prepare_served_base(trainer: Trainer, name: str, model: Any, demos: Demos | None, *,
                              resumed: bool) -> None:
    """Before the vLLM servers of ``name``, a base of adapter policies, load ``model`` (the
    copy they serve): fit the shared warm start into it (untied first), or on resume load the
    one saved then, and keep it as the base of the adapters' train engine
    (``trainer.served_bases``, until ``setup_adapter_policy`` hands it to that engine: the
    base is then held once on the train side). A no-op for any other policy; an in-process
    base is fitted in ``setup_adapter_policy`` instead (its replicas take the update)."""
    if (trainer.policies[name].inference.kind != "vllm"
            or name not in adapter_bases(trainer.policies)):
        return
    trainer.served_bases[name] = model
    if resumed:
        state = _saved_base(trainer, name)
        if state is not None:
            _untie_as_saved(model, state)
            copy_weights_into(model, state.items())
    elif trainer.policies[name].sft_steps and demos is not None:
        untie_embeddings(model)
        await _fit_base(trainer, name, model, demos)
        _save_base(trainer, name, model)


async def _fit_base(trainer: Trainer, base: str, model: Any, demos: Demos) -> None:
    """The base's format-only SFT warm start, fitted into ``model`` in place, on the
    transcripts of every agent that plays one of its adapters (logged as
    ``warm_start_metrics``)."""
    policy = trainer.policies[base]
    adapters = set(adapter_bases(trainer.policies)[base])
    # mixed in each batch as demos.shares says (default: alike)
    transcripts = demos.of_agents_of(trainer.policy_of, adapters)
    factory = backend_factory(trainer.policies[sorted(adapters)[0]].backend)
    label = warm_start_label(policy.sft_steps, policy.sft_target_loss)
    with trainer.startup.phase(f"SFT warm start of the base {base} ({label})"):
        losses = await warm_start_policy(policy, model, trainer.tokenizers[base], factory,
                                         transcripts, trainer.seed, demos.shares)
    if losses:
        trainer.logger.log(0, warm_start_metrics(base, losses))


def _base_path(trainer: Trainer, base: str) -> Path | None:
    return (Path(trainer.run_dir) / "checkpoints" / "base" / f"{base}.pt"
            if trainer.run_dir else None)


def _save_base(trainer: Trainer, base: str, model: Any) -> None:
    """Keep the warm-started base (frozen from now on) for a resumed run: a resume skips the
    warm start, and the adapters' checkpoints hold only the adapters."""
    path = _base_path(trainer, base)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: t.detach().clone() for n, t in model.state_dict().items()}, path)


def _saved_base(trainer: Trainer, base: str) -> dict[str, torch.Tensor] | None:
    """The warm-started base ``_save_base`` wrote (``None`` when the base has no warm start).

    Raises:
        ConfigError: the base has ``sft_steps`` but the run directory has no saved base.
    """
    path = _base_path(trainer, base)
    if path is None or not path.exists():
        if trainer.policies[base].sft_steps:
            raise ConfigError(f"resuming the adapters of {base!r}: its warm-started weights "
                              f"{path} are missing (written when the run starts)")
        return None
    return torch.load(path, weights_only=True)


def _untie_as_saved(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Untie ``model`` when the saved base was untied (it holds its own ``lm_head``), so
    loading ``state`` gives the head its own weights (``untie_embeddings``: a no-op when
    ``model`` is untied already)."""
    if any(n.endswith("lm_head.weight") for n in state):
        untie_embeddings(model)


async def _restore_base(trainer: Trainer, base: str, replicas: list[Any]) -> None:
    """On resume: load the warm-started base ``_save_base`` wrote into every replica (untied
    first when it was untied), so the adapters resume on the base they were trained over."""
    state = _saved_base(trainer, base)
    if state is None:
        return
    with trainer.startup.phase(f"restoring the warm-started base {base}"):
        for replica in replicas:
            _untie_as_saved(replica.model, state)
            await replica.update_weights(WeightUpdate(named_tensors=state.items(), version=0))


async def _warm_start_adapter(trainer: Trainer, name: str, view: AdapterTrainEngine,
                              demos: Demos) -> None:
    """Adapter policy ``name``'s own SFT warm start on its agents' transcripts (logged as
    ``warm_start_metrics``)."""
    policy = trainer.policies[name]
    transcripts = [t for ts in demos.of_agents_of(trainer.policy_of, {name}).values()
                   for t in ts]
    plan = warm_start_plan(policy, trainer.tokenizers[policy.adapter_of], transcripts,
                           trainer.seed)
    if plan is None:
        return
    label = warm_start_label(plan.steps, plan.target_loss)
    with trainer.startup.phase(f"SFT warm start of the adapter {name} ({label})"):
        losses = await asyncio.to_thread(view.warm_start, plan)
    trainer.logger.log(0, warm_start_metrics(name, losses))


def _own_reference(trainer: Trainer, name: str, shared: SharedLoRABase,
                   view: AdapterTrainEngine, resumed: bool) -> AdapterTrainEngine:
    """The KL reference of a warm-started adapter: its values at the start of RL, saved once
    to ``run_dir/checkpoints/reference/<name>.pt`` and loaded from there on resume."""
    path = (Path(trainer.run_dir) / "checkpoints" / "reference" / f"{name}.pt"
            if trainer.run_dir else None)
    if resumed and path is not None and path.exists():
        return shared.reference_of(view, torch.load(path, weights_only=True))
    if resumed:
        raise ConfigError(f"resuming adapter policy {name!r}: its KL reference {path} is "
                          "missing (it is written when the run starts)")
    ref = shared.reference_of(view)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref.values, path)
    return ref


def _first_update(view: Any) -> WeightUpdate:
    return WeightUpdate(named_tensors=view.export_weights(), version=0)


def _plain_copy(model: Any) -> Any:
    """A copy of the served base without the serving adapters' layers (plain ``nn.Linear`` /
    ``nn.Embedding``)."""
    from torch import nn

    from areal_agents.engines.lora import MultiLoRAEmbedding, MultiLoRALinear

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, MultiLoRALinear | MultiLoRAEmbedding):
            module.__class__ = nn.Embedding if isinstance(module, nn.Embedding) else nn.Linear
            for attr in ("lora_a", "lora_b", "lora_scaling", "lora_rows", "_stacks"):
                module.__dict__.pop(attr, None)
    return model.train()
