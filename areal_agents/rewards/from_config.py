"""Reward functions named in a run config: ``reward_fns: [{type: <name>, <arguments>}]``.

Each entry is a mapping with a ``type`` and that type's keyword arguments::

    reward_fns:
      - type: reference_judge      # a frozen policy of the run grades each answer
        policy: judge              # must be one of `policies` (frozen, not in policy_map)
        api: completions
        template: "{task}\\nReference: {reference}\\n{answer}\\nCorrect:"
        on_failure: fallback
        fallback: 0.0
      - type: reward_model         # a model written by `areal-agents train-rm --out DIR`
        path: runs/rm
        normalize: sigmoid
      - type: mypkg.rewards:length_penalty   # any function or class, by import path

Types: ``rubric_judge`` (``RubricJudge``), ``reference_judge`` (``ReferenceJudge``),
``group_judge`` (``GroupJudge``, a group reward: one call per GRPO group), ``reward_model``
(``RewardModelReward`` of ``RewardModel.load(path)``), or ``"module:attr"``: a class (or
factory) called with the other keys, or a function used as it is (then no other keys). A
``"module:attr"`` entry with ``group: true`` is a group reward function. Lists in YAML become
tuples where the argument is a ``scale``. ``check_reward_spec`` validates an entry without
loading anything (used when the config is parsed); ``build_reward_fns`` builds them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["REWARD_TYPES", "build_reward_fn", "build_reward_fns", "check_reward_spec"]


def _judge(name: str) -> Callable[..., Any]:
    from . import judges

    return getattr(judges, name)


def _reward_model(path: str, **kwargs: Any) -> Any:
    from .reward_model import RewardModel, RewardModelReward

    return RewardModelReward(RewardModel.load(path), **kwargs)


REWARD_TYPES: dict[str, str] = {
    "rubric_judge": "RubricJudge",
    "reference_judge": "ReferenceJudge",
    "group_judge": "GroupJudge",
    "reward_model": "RewardModelReward",
}
"""The built-in ``type`` names and the class each builds."""

_GROUP_TYPES = {"group_judge"}


def _accepted(name: str) -> set[str] | None:
    """Keyword arguments a built-in type accepts (None: any)."""
    if name == "reward_model":
        from .reward_model import RewardModelReward

        return {"path", *inspect.signature(RewardModelReward).parameters} - {"rm"}
    from .judges import Judge

    cls = _judge(REWARD_TYPES[name])
    own = {p for p, v in inspect.signature(cls).parameters.items() if v.kind != v.VAR_KEYWORD}
    return own | set(inspect.signature(Judge).parameters)


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward type {target!r}: cannot import {module_name!r} ({exc})"
                         ) from None
    if not hasattr(module, attr):
        raise ValueError(f"reward type {target!r}: {module_name} has no {attr!r}")
    return getattr(module, attr)


def check_reward_spec(spec: Mapping[str, Any], policies: Sequence[str] | None = None) -> None:
    """Validate one ``reward_fns`` entry without building it.

    Args:
        spec: ``{"type": ..., <arguments>}``.
        policies: the run's policy names; a judge's ``policy`` must be one of them.

    Raises:
        ValueError: no or unknown ``type``, an argument the type does not take, or a judge
            calling a policy the run does not have; the message names the fix.
    """
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a reward_fns entry needs a 'type' (one of {sorted(REWARD_TYPES)} or "
                         f"'module:attr'), got {spec!r}")
    kind, args = str(spec["type"]), {k: v for k, v in spec.items() if k != "type"}
    if kind not in REWARD_TYPES:
        if ":" not in kind:
            raise ValueError(f"unknown reward type {kind!r}; choose one of "
                             f"{sorted(REWARD_TYPES)} or give 'module:attr'")
        return
    accepted = _accepted(kind)
    unknown = sorted(set(args) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"reward type {kind!r} takes no argument(s) {unknown}; it takes "
                         f"{sorted(accepted or ())}")
    if kind == "reward_model" and "path" not in args:
        raise ValueError("reward type 'reward_model' needs path: a directory written by "
                         "`areal-agents train-rm --out DIR`")
    if kind != "reward_model" and "client" in args:
        raise ValueError(f"reward type {kind!r}: a client cannot come from YAML; name a "
                         "policy of the run (policy: <name>), e.g. one with an endpoint")
    policy = args.get("policy")
    if kind != "reward_model" and policy is None:
        raise ValueError(f"reward type {kind!r} needs policy: the name of the run's policy "
                         "that serves the judge model")
    if policies is not None and policy is not None and policy not in policies:
        raise ValueError(f"reward type {kind!r} calls policy {policy!r}, which is not in "
                         f"policies {sorted(policies)}; add it (frozen: true) or fix the name")


def build_reward_fn(spec: Mapping[str, Any]) -> tuple[Any, bool]:
    """``(reward function, is_group)`` of one ``reward_fns`` entry (``check_reward_spec``
    rules; a ``reward_model`` loads its weights here).

    Raises:
        ValueError: as ``check_reward_spec``, or an import path that does not resolve.
    """
    check_reward_spec(spec)
    kind, args = str(spec["type"]), {k: v for k, v in spec.items() if k != "type"}
    if "scale" in args and isinstance(args["scale"], list):
        args["scale"] = tuple(args["scale"])
    if kind == "reward_model":
        return _reward_model(**args), False
    if kind in REWARD_TYPES:
        return _judge(REWARD_TYPES[kind])(**args), kind in _GROUP_TYPES
    is_group = bool(args.pop("group", False))
    target = _import(kind)
    if inspect.isclass(target) or args:
        return target(**args), is_group
    return target, is_group


def build_reward_fns(specs: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """``(reward_fns, group_reward_fns)`` for ``Trainer`` from config entries, in order."""
    fns: list[Any] = []
    group_fns: list[Any] = []
    for spec in specs:
        fn, is_group = build_reward_fn(spec)
        (group_fns if is_group else fns).append(fn)
    return fns, group_fns
