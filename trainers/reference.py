"""KL reference policies: a frozen engine per trainable policy, restorable on resume.

The reference is built where the policy trains: in the controller for a one-process policy
(``build_reference``), on every worker rank for a worker-group policy (``ReferenceSpec`` is
what the ranks receive; ``trainers/worker_group.py``), so the controller never holds it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_agents.errors import ConfigError

from .checkpointing import load_reference, reference_path, save_reference
from .policy import Policy

__all__ = ["ReferenceSpec", "build_reference", "reference_model"]


@dataclass(frozen=True)
class ReferenceSpec:
    """How to build policy ``name``'s KL reference model (picklable: worker ranks get it).

    Attributes:
        name: the policy's name (the reference file is ``checkpoints/reference/<name>.pt``).
        ref_model: ``Policy.ref_model`` (``None``: the policy's initial weights, after the
            warm start).
        seed: ``Policy.seed`` (a tiny ``ref_model`` spec is seeded by it).
        run_dir: the run's directory (``None``: nothing saved or loaded).
        resumed: load the saved reference instead of deriving it.
    """

    name: str
    ref_model: Any
    seed: int
    run_dir: Path | None
    resumed: bool

    @classmethod
    def of(cls, name: str, policy: Policy, run_dir: Path | None, resumed: bool) -> ReferenceSpec:
        """The spec of trainable policy ``name``."""
        return cls(name, policy.ref_model, policy.seed, run_dir, resumed)


def reference_model(spec: ReferenceSpec, model: Any, *, save: bool = True) -> Any:
    """The frozen reference module: ``spec.ref_model`` if set, else a copy of ``model`` (the
    policy's initial weights, after the warm start).

    A fresh run saves it once to ``run_dir/checkpoints/reference/<name>.pt`` (when ``save``;
    worker ranks other than 0 pass ``False``); a resumed run (``spec.resumed``) loads it from
    there, so it never depends on re-running the warm start.

    Raises:
        ConfigError: ``ref_model`` has another vocabulary/width than the policy, or a resumed
            run has no saved reference (it was started without a KL penalty).
    """
    if spec.ref_model is None:
        ref = copy.deepcopy(model)
    else:
        ref = Policy(model=spec.ref_model, seed=spec.seed).load()[0]
    if ref.get_input_embeddings().weight.shape != model.get_input_embeddings().weight.shape:
        raise ConfigError(f"policies.{spec.name}.ref_model={spec.ref_model!r} has another "
                          "vocabulary/width than the policy; the KL needs the same tokenizer")
    if spec.resumed:
        assert spec.run_dir is not None
        if not load_reference(spec.run_dir, spec.name, ref):
            raise ConfigError(
                f"resuming with kl_coef > 0 but {reference_path(spec.run_dir, spec.name)} does "
                "not exist (the run was started without a KL penalty); start a new run_dir or "
                "set algorithm.kl_coef=0")
    elif spec.run_dir is not None and save:
        save_reference(spec.run_dir, spec.name, ref)
    return ref


def build_reference(name: str, policy: Policy, model: Any, factory: Callable[..., Any],
                    run_dir: Path | None, resumed: bool) -> Any:
    """A frozen engine (``factory(reference, lr=...)``, only ``forward_logprobs`` is used)
    holding policy ``name``'s KL reference (``reference_model``), in this process.

    Its ``forward_logprobs(batch)`` uses the batch's per-row sampling params, the same
    definition as the policy's log-probs (``TrainEngine``), so the KL compares the two
    policies' sampling distributions.

    Raises:
        ConfigError: as ``reference_model``.
    """
    ref = reference_model(ReferenceSpec.of(name, policy, run_dir, resumed), model)
    return factory(ref, lr=policy.lr, **policy.train_kwargs)
