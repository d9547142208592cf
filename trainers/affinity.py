"""CPU affinity: which CPU ids a process (a train worker, the controller) may run on.

``check_cpus`` validates a set of CPU ids against this host (``available_cpus``: its online
CPUs, within the container's cgroup cpuset when there is one; not this thread's current
affinity, which an earlier pin or ``taskset`` may have narrowed and which a process may widen
again within that set); ``pin_process``
applies it to every thread of the calling process (Linux: ``sched_setaffinity`` acts on one
thread, so each thread in ``/proc/self/task`` is pinned; threads started later inherit it from
the thread that starts them, and so do child processes) and returns the torch thread count
that follows from it: never more threads than pinned CPUs.

Affinity is Linux-only here: elsewhere ``check_cpus`` raises ``ConfigError`` (set no ``cpus``).

Example:
    >>> check_cpus("Policy.train.cpus", [sorted(available_cpus())[0]])  # doctest: +ELLIPSIS
    (...,)
    >>> check_cpus("Policy.train.cpus", [10_000])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    areal_agents.errors.ConfigError: Policy.train.cpus: CPU id(s) [10000] are not available on this host; available: [...]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from areal_agents.errors import ConfigError

__all__ = ["CPU_LISTS", "available_cpus", "check_cpus", "parse_cpu_list", "pin_process"]


CPU_LISTS = ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/devices/system/cpu/online")
"""Where the CPUs a process may be pinned to are listed (Linux list format ``0-3,6``): the
cgroup v2 cpuset first, then the host's online CPUs."""


def parse_cpu_list(text: str) -> set[int]:
    """A Linux CPU list (``"0-2,5"``) as a set of ids.

    Example:
        >>> sorted(parse_cpu_list("0-2,5"))
        [0, 1, 2, 5]
    """
    ids: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            ids.update(range(int(first), int(last or first) + 1))
    return ids


def available_cpus() -> set[int]:
    """The CPU ids a process of this host may be pinned to (the first readable, non-empty
    list of ``CPU_LISTS``; else this process's current affinity).

    Raises:
        ConfigError: the platform has no CPU affinity (not Linux).
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("cpus: CPU affinity needs Linux (os.sched_setaffinity); remove cpus "
                          "on this platform")
    for path in CPU_LISTS:
        try:
            ids = parse_cpu_list(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if ids:
            return ids
    return set(os.sched_getaffinity(0))


def check_cpus(owner: str, cpus: Iterable[int]) -> tuple[int, ...]:
    """``cpus`` as a sorted tuple of distinct CPU ids, all available to this process.

    Args:
        owner: the config field, for the message (e.g. ``"Policy.train.cpus"``).
        cpus: CPU ids (integers >= 0).

    Raises:
        ConfigError: an empty set, a non-integer id, ids this host does not offer (the message
            lists the available ones), or a platform without affinity.
    """
    ids = list(cpus)
    if not ids:
        raise ConfigError(f"{owner}: an empty CPU list; give at least one CPU id or omit it")
    bad = [c for c in ids if isinstance(c, bool) or not isinstance(c, int) or c < 0]
    if bad:
        raise ConfigError(f"{owner}: CPU ids must be integers >= 0, got {bad}")
    available = available_cpus()
    missing = sorted(set(ids) - available)
    if missing:
        raise ConfigError(f"{owner}: CPU id(s) {missing} are not available on this host; "
                          f"available: {sorted(available)}")
    return tuple(sorted(set(ids)))


def _thread_ids() -> list[int]:
    """Every thread of this process (Linux ``/proc``; just this one when unreadable)."""
    try:
        return [int(t.name) for t in Path("/proc/self/task").iterdir()]
    except OSError:
        return [0]


def pin_process(cpus: Iterable[int], threads: int | None = None) -> int:
    """Pin every thread of this process to ``cpus`` and set torch's thread count to
    ``min(threads, len(cpus))`` (``threads=None``: ``len(cpus)``).

    Returns:
        The torch thread count set.

    Raises:
        ConfigError: as ``check_cpus``.
    """
    import torch

    ids = check_cpus("cpus", cpus)
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, ids)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    count = len(ids) if threads is None else max(1, min(threads, len(ids)))
    torch.set_num_threads(count)
    return count
