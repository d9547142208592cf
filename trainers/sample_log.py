"""``SampleLog``: a bounded record of trained samples for the trajectory viewer.

At each global step the trainer keeps at most ``per_policy`` of the samples each policy trained
on and writes them to ``run_dir/samples/step_<n>.jsonl``, one JSON object per sample (read by
``areal-agents view RUN_DIR``, ``areal_agents.viewer``)::

    step, policy, agent, task_seed, episode, policy_version  # the version it was trained at
    reward, advantage                    # advantage: mean over the trained (loss-mask) tokens
    token_ids, tokens                    # the exact ids and each id decoded on its own
    loss_mask, logprobs, versions, advantages  # per token, aligned with token_ids
    messages                             # the agent's episode transcript (chat messages)

Cost: the chosen samples are evenly spaced over the batch (different task seeds and agents).
``stage`` only keeps references (called inside the train step); the trainer writes a step with
``submit``, which hands the decoding (token strings), rounding and JSON writing to one
background thread (started on first use; steps are written in order) so none of it runs on
the event loop or the train step; ``drain`` waits for the writes (``afit`` drains before it
returns, so the files exist once it has) and ``close`` also stops the thread. ``flush`` is the
same write done in the calling thread. With ``per_policy=0`` or no ``run_dir`` every method
does nothing (a null object: the trainer calls it unconditionally). A step's file is
rewritten, not appended to, so a resumed run replaces what a crashed run wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from areal_agents.errors import ConfigError
from areal_agents.samples import Sample

__all__ = ["SampleLog", "evenly_spaced"]


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(n, k)`` distinct indices spread over ``range(n)``, the first one 0.

    Example:
        >>> evenly_spaced(8, 2), evenly_spaced(3, 5), evenly_spaced(5, 0)
        ([0, 4], [0, 1, 2], [])
    """
    k = min(n, k)
    return [i * n // k for i in range(k)]


_Staged = tuple[Sample, Any, int, Any]
"""A staged sample: ``(sample, its [len] advantages or None, version, tokenizer)``."""


def _round(xs: Iterable[float]) -> list[float]:
    return [round(float(x), 4) for x in xs]


class SampleLog:
    """Writes up to ``per_policy`` trained samples per policy per step (layout above).

    Args:
        run_dir: the run directory (None: record nothing).
        per_policy: samples kept per policy per step; 0 turns recording off.

    Raises:
        ConfigError: ``per_policy`` is negative.
    """

    def __init__(self, run_dir: str | Path | None, per_policy: int = 2) -> None:
        if per_policy < 0:
            raise ConfigError(f"record_samples must be >= 0 (0 = off), got {per_policy}")
        self.per_policy = per_policy
        self.dir = Path(run_dir) / "samples" if run_dir is not None and per_policy else None
        self._staged: dict[str, list[_Staged]] = {}
        self._writer: ThreadPoolExecutor | None = None  # started by the first submit
        self._pending: list[Future[Path | None]] = []

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def attach(self, by_policy: Mapping[str, Sequence[Sample]], messages: Mapping[str, Any]
               ) -> None:
        """Give each sample its agent's transcript (``meta["messages"]``, by reference)."""
        if not self.enabled:
            return
        for samples in by_policy.values():
            for s in samples:
                s.meta["messages"] = messages.get(s.agent, [])

    def stage(self, policy: str, samples: Sequence[Sample], advantages: Any, version: int,
              tokenizer: Any) -> None:
        """Keep the chosen samples of ``policy``'s batch until ``flush``.

        Args:
            samples: the batch, in row order.
            advantages: the prepared batch's ``[batch, seq]`` advantages (None: not recorded).
            version: the policy's version when it trained on them.
            tokenizer: decodes the token strings (at ``flush``).
        """
        if not self.enabled:
            return
        rows = []
        for i in evenly_spaced(len(samples), self.per_policy):
            adv = None  # a view of the row, cut and rounded when written
            if advantages is not None and advantages.shape[0] == len(samples):
                adv = advantages[i, : len(samples[i])]
            rows.append((samples[i], adv, version, tokenizer))
        self._staged[policy] = rows

    def flush(self, step: int, policies: Iterable[str]) -> Path | None:
        """Write the staged samples of ``policies`` as global step ``step`` now, in this
        thread; returns the file (None when nothing was written)."""
        return self._write(step, self._take(policies))

    def submit(self, step: int, policies: Iterable[str]) -> None:
        """``flush`` in the background writer thread: the staged samples of ``policies`` are
        taken now (later ``stage`` calls do not change them) and written after the steps
        submitted before. A failed earlier write raises here (or in ``drain``)."""
        self._raise_failed(wait=False)
        staged = self._take(policies)
        if self.dir is None or not staged:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="aa-sample-log")
        self._pending.append(self._writer.submit(self._write, step, staged))

    def drain(self) -> None:
        """Wait until every submitted step is written; raise the first write's error."""
        self._raise_failed(wait=True)

    def close(self) -> None:
        """``drain``, then stop the writer thread (a later ``submit`` starts a new one).
        Idempotent."""
        try:
            self.drain()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def _raise_failed(self, *, wait: bool) -> None:
        pending = self._pending
        for i, future in enumerate(pending):
            if not wait and not future.done():
                self._pending = pending[i:]  # still writing; steps finish in order
                return
            self._pending = pending[i + 1:]
            future.result()  # re-raises the write's error
        self._pending = []

    def _take(self, policies: Iterable[str]) -> list[tuple[str, _Staged]]:
        return [(p, staged) for p in sorted(policies) for staged in self._staged.pop(p, [])]

    def _write(self, step: int, staged: list[tuple[str, _Staged]]) -> Path | None:
        if self.dir is None or not staged:
            return None
        rows = [self.row(step, p, s, None if adv is None else _round(adv.tolist()), version,
                         tokenizer) for p, (s, adv, version, tokenizer) in staged]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step}.jsonl"
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        return path

    @staticmethod
    def row(step: int, policy: str, s: Sample, advantages: list[float] | None, version: int,
            tokenizer: Any) -> dict[str, Any]:
        """One sample as the JSON object described in the module docstring."""
        trained = [a for a, m in zip(advantages or [], s.loss_mask, strict=False) if m]
        return {
            "step": step, "policy": policy, "agent": s.agent,
            "task_seed": int(s.group) if s.group.lstrip("-").isdigit() else s.group,
            "episode": s.meta.get("episode"), "policy_version": version,
            "reward": round(float(s.reward), 4),
            "advantage": round(sum(trained) / len(trained), 4) if trained else None,
            "token_ids": list(s.token_ids),
            "tokens": tokenizer.batch_decode([[t] for t in s.token_ids]),
            "loss_mask": list(s.loss_mask), "logprobs": _round(s.logprobs),
            "versions": list(s.versions), "advantages": advantages,
            "messages": list(s.meta.get("messages", [])),
        }
