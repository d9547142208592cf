"""``actor_options``: the Ray options every actor of ``launcher: ray`` is started with.

One bundle of a placement group per actor, and the driver's CPU priority. Ray starts its
worker processes at niceness 15 (``RAY_worker_niceness``) so that its own daemons stay
responsive; on a host shared with other work (or with the controller itself, which runs at
the user's niceness) that starves the training ranks and engine servers: on a 2-core host at
load 15-21, a 40-step SFT warm start on two Ray ranks took 215 s (32 s at load 3). The actors
here ask for niceness 0 relative to their raylet, so they run at the priority of the node's
Ray (``nice -n 10 areal-agents train ...`` with a local Ray instance: 10, as the controller).
Processes an actor starts (an engine server) inherit it.

``RayLauncher`` sets it for the whole job (``JOB_RUNTIME_ENV`` in ``ray.init``); an actor of
a job without it (Ray initialised elsewhere) carries it in its own ``runtime_env``. Either way
an actor needs a fresh worker process (Ray's prestarted ones run at 15): ~1 s more per start
with the job's setting, ~3 s with the actor's (2-core host, load 5).

Example:
    >>> actor_options({"CPU": 0.5}, None, 0)["runtime_env"]  # Ray not initialised here
    {'env_vars': {'RAY_worker_niceness': '0'}}
"""

from __future__ import annotations

from typing import Any

__all__ = ["JOB_RUNTIME_ENV", "WORKER_NICENESS", "actor_options"]

WORKER_NICENESS = 0
"""Niceness of the actors' worker processes, added to their raylet's (Ray's default: 15)."""

JOB_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": str(WORKER_NICENESS)}}
"""The ``runtime_env`` of ``ray.init`` that gives every worker of the job ``WORKER_NICENESS``."""


def _job_sets_niceness() -> bool:
    """Whether this process's Ray job already runs its workers at ``WORKER_NICENESS``."""
    import ray

    if not ray.is_initialized():
        return False
    env = ray.get_runtime_context().runtime_env or {}
    return (env.get("env_vars") or {}).get("RAY_worker_niceness") == str(WORKER_NICENESS)


def actor_options(bundle: dict[str, float], placement_group: Any, index: int) -> dict[str, Any]:
    """``ActorClass.options(**...)`` for an actor taking exactly ``bundle`` in bundle ``index``
    of ``placement_group`` (None: no placement group), at ``WORKER_NICENESS`` (its own
    ``runtime_env`` unless the job's sets it)."""
    options: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    if not _job_sets_niceness():
        options["runtime_env"] = {"env_vars": dict(JOB_RUNTIME_ENV["env_vars"])}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=index)
    return options
