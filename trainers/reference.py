"""KL reference policies: a frozen engine per trainable policy, restorable on resume."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from areal_agents.errors import ConfigError

from .checkpointing import load_reference, reference_path, save_reference
from .policy import Policy


def build_reference(name: str, policy: Policy, model: Any, factory: Callable[..., Any],
                    run_dir: Path | None, resumed: bool) -> Any:
    """A frozen engine (``factory(reference, lr=...)``, only ``forward_logprobs`` is used)
    holding policy ``name``'s KL reference: ``policy.ref_model`` if set, else a copy of
    ``model`` (the policy's initial weights, after the warm start).

    Its ``forward_logprobs(batch)`` uses the batch's per-row sampling params, the same
    definition as the policy's log-probs (``TrainEngine``), so the KL compares the two
    policies' sampling distributions.

    A fresh run saves the reference once to ``run_dir/checkpoints/reference/<name>.pt``; a
    resumed run (``resumed``) loads it from there, so it never depends on re-running the warm
    start.

    Raises:
        ConfigError: ``ref_model`` has another vocabulary/width than the policy, or a resumed
            run has no saved reference (it was started without a KL penalty).
    """
    ref = copy.deepcopy(model) if policy.ref_model is None else policy.load(policy.ref_model)[0]
    if ref.get_input_embeddings().weight.shape != model.get_input_embeddings().weight.shape:
        raise ConfigError(f"policies.{name}.ref_model={policy.ref_model!r} has another "
                          "vocabulary/width than the policy; the KL needs the same tokenizer")
    if resumed:
        assert run_dir is not None
        if not load_reference(run_dir, name, ref):
            raise ConfigError(
                f"resuming with kl_coef > 0 but {reference_path(run_dir, name)} does not exist "
                "(the run was started without a KL penalty); start a new run_dir or set "
                "algorithm.kl_coef=0")
    elif run_dir is not None:
        save_reference(run_dir, name, ref)
    return factory(ref, lr=policy.lr, **policy.train_kwargs)
