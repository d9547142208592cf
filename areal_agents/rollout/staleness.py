"""Per-policy staleness control: AReaL's admission rule as a small pure state machine.

Units are *episodes* of one policy (each admitted episode yields that policy's samples for one
train-batch slot). For a policy at weight ``version`` with ``running`` episodes generating,
``waiting`` episodes done generating but waiting for the rest of their group, and ``accepted``
episodes accepted into its buffer so far (cumulative since the last rebase)::

    capacity = min(max_concurrent - running,
                   (max_staleness + version + 1) * batch_size + overshoot
                   - (accepted + running + waiting))

``overshoot`` (0 unless ``consume`` is used) credits the episodes a step trained beyond
``batch_size`` (a batch of whole groups may exceed it when groups lost members): without it
every such step would shrink the admission budget for good, down to a deadlock.

A new episode is admitted only while ``capacity > 0`` and the policy is not paused, so at most
``max_staleness`` batches are generated ahead of training; ``max_staleness=0`` is synchronous
training. An episode that finished generating is ``release``d: it frees its concurrency slot at
once (the engine can start another) but keeps its staleness slot until its group ends.
Filtered and failed episodes free both without counting as accepted, so a batch whose
samples are all filtered never deadlocks. (Episodes that outlive ``max_staleness`` versions
anyway, e.g. a long-tail straggler, are dropped by the controller at training time.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

Outcome = Literal["accepted", "filtered", "failed"]


@dataclass
class StalenessControl:
    """Admission counters of one trainable policy.

    Args:
        batch_size: episodes per train step of this policy (>= 1).
        max_staleness: versions a sample may lag behind at training time (>= 0).
        max_concurrent: episodes in flight at most (>= 1).

    Example:
        >>> s = StalenessControl(batch_size=2, max_staleness=0, max_concurrent=8)
        >>> s.capacity()
        2
        >>> s.admit(2); s.capacity()
        0
        >>> s.finish("accepted", 2); s.set_version(1); s.capacity()
        2
    """

    batch_size: int
    max_staleness: int = 0
    max_concurrent: int = 64
    version: int = 0
    running: int = 0
    waiting: int = 0
    accepted: int = 0
    submitted: int = 0
    filtered: int = 0
    failed: int = 0
    paused: bool = False
    overshoot: int = 0
    consumed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")

    def capacity(self) -> int:
        """Episodes that may still be admitted now (0 while paused; never negative)."""
        if self.paused:
            return 0
        by_concurrency = self.max_concurrent - self.running
        by_staleness = (self.max_staleness + self.version + 1) * self.batch_size + self.overshoot - (
            self.accepted + self.running + self.waiting
        )
        return max(0, min(by_concurrency, by_staleness))

    def admit(self, n: int = 1) -> None:
        """Record ``n`` admitted episodes.

        Raises:
            RuntimeError: ``n`` exceeds ``capacity()`` (the caller must check first).
        """
        if n > self.capacity():
            raise RuntimeError(
                f"admit({n}) exceeds capacity {self.capacity()} (version={self.version}, "
                f"running={self.running}, accepted={self.accepted}, paused={self.paused})"
            )
        self.running += n
        self.submitted += n

    def release(self, n: int = 1) -> None:
        """Record ``n`` running episodes done generating (``running`` -> ``waiting``).

        Raises:
            RuntimeError: more episodes released than are running.
        """
        if n > self.running:
            raise RuntimeError(f"release({n}) but only {self.running} running")
        self.running -= n
        self.waiting += n

    def finish(self, outcome: Outcome, n: int = 1, *, released: bool = False) -> None:
        """Record ``n`` episodes ending as ``outcome``: ``waiting`` ones if ``released``,
        else ``running`` ones.

        Raises:
            RuntimeError: more episodes finished than are running (or waiting).
            ValueError: unknown ``outcome``.
        """
        source = "waiting" if released else "running"
        if n > getattr(self, source):
            raise RuntimeError(f"finish({outcome!r}, {n}) but only {getattr(self, source)} {source}")
        if outcome not in ("accepted", "filtered", "failed"):
            raise ValueError(f"outcome must be 'accepted', 'filtered' or 'failed', got {outcome!r}")
        setattr(self, source, getattr(self, source) - n)
        setattr(self, outcome, getattr(self, outcome) + n)

    def consume(self, n: int) -> None:
        """Record ``n`` accepted episodes taken for the step whose update comes next."""
        self.consumed += n

    def set_version(self, version: int) -> None:
        """The policy's weights moved to ``version`` (>= the current one).

        If episodes were ``consume``d for it, the ones beyond ``batch_size`` per version
        (or short of it) are credited to ``overshoot``.
        """
        if version < self.version:
            raise ValueError(f"version may not go backwards: {self.version} -> {version}")
        if self.consumed:
            self.overshoot += self.consumed - (version - self.version) * self.batch_size
            self.consumed = 0
        self.version = version

    def pause(self) -> None:
        """Stop admitting (idempotent)."""
        self.paused = True

    def resume(self) -> None:
        """Admit again (idempotent)."""
        self.paused = False

    @contextmanager
    def updating(self, new_version: int) -> Iterator[None]:
        """Pause for a weight update; bump to ``new_version`` only if the body succeeds.

        Always resumes, even when the update raises, so a failed update never leaves the
        policy paused; the exception propagates.
        """
        self.pause()
        try:
            yield
            self.set_version(new_version)
        finally:
            self.resume()

    def rebase(self, version: int, trained_episodes: int | None = None) -> None:
        """Restart the counters after resuming from a checkpoint at ``version``.

        In-flight and buffered episodes of the killed run are gone, so ``running`` and
        ``waiting`` are 0 and
        ``accepted`` becomes the episodes already trained (``version * batch_size`` unless
        given), which makes ``capacity()`` the same as right after that version's update.
        """
        self.version = version
        self.running = 0
        self.waiting = 0
        self.paused = False
        self.overshoot = self.consumed = 0
        self.accepted = version * self.batch_size if trained_episodes is None else trained_episodes

    def state_dict(self) -> dict[str, int | bool]:
        """Counters for checkpointing / logging."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Restore counters saved by ``state_dict``, then ``rebase`` to the saved version."""
        for key in ("submitted", "filtered", "failed"):
            setattr(self, key, int(state.get(key, 0)))
        self.rebase(int(state["version"]))
