"""Metric loggers (JSONL, TensorBoard, W&B, null) and the live ``rich`` progress bar.

Every logger has ``log(step, metrics)`` and ``close()``; the trainer calls them
unconditionally (use ``NullLogger`` to log nothing).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

_log = logging.getLogger(__name__)


class Logger(Protocol):
    """Sink of scalar metrics."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Logs nothing."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


class JSONLLogger:
    """One JSON object per ``log`` call: ``{"step", "time", **metrics}`` appended to ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._t0 = time.time()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3), **_finite(metrics)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class TensorBoardLogger:
    """Scalars to a TensorBoard event directory.

    Raises:
        ModuleNotFoundError: ``tensorboard`` is not installed (names the extra to install).
    """

    def __init__(self, log_dir: str | Path) -> None:
        from areal_agents.extras import require

        require("tensorboard", "tensorboard", "TensorBoard logging (logging.tensorboard)")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in _finite(metrics).items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Weights & Biases run: ``wandb.init(project, name, config, ...)``, ``run.log(metrics,
    step=step)`` per call, ``run.finish()`` on close.

    With ``run_dir`` the W&B run id is kept in ``run_dir/wandb_run_id`` and reused (with
    ``resume="allow"``), so a resumed training continues the same W&B run.

    Raises:
        ImportError: ``wandb`` is not installed (the message says ``pip install wandb``).
    """

    def __init__(self, project: str, config: Mapping[str, Any] | None = None, *,
                 name: str | None = None, run_dir: str | Path | None = None,
                 **kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("W&B logging was asked for (logging.wandb_project) but wandb is not"
                              " installed: `pip install wandb`, or unset logging.wandb_project"
                              ) from exc
        if run_dir is not None:
            id_file = Path(run_dir) / "wandb_run_id"
            if id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = uuid.uuid4().hex[:16]
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id)
            kwargs = {"id": run_id, "resume": "allow", "dir": str(run_dir), **kwargs}
        self._run = wandb.init(project=project, name=name, config=dict(config or {}), **kwargs)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(_finite(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MultiLogger:
    """Fan out to several loggers."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def make_logger(run_dir: str | Path | None, *, tensorboard: bool = True,
                wandb_project: str | None = None, config: Mapping[str, Any] | None = None,
                wandb_name: str | None = None, wandb_entity: str | None = None) -> Logger:
    """JSONL (``run_dir/metrics.jsonl``) + TensorBoard (``run_dir/tb``) + optional W&B.

    Without ``tensorboard`` installed, one warning line names the extra to install and the
    run goes on with JSONL (and W&B).

    W&B is used when ``wandb_project`` is set: run ``wandb_name`` (default: ``run_dir``'s
    name) in ``wandb_entity``, with ``config`` as the run config.

    Raises:
        ImportError: W&B asked for but ``wandb`` is not installed (says ``pip install wandb``).
    """
    if run_dir is None and wandb_project is None:
        return NullLogger()
    loggers: list[Logger] = []
    if run_dir is not None:
        loggers.append(JSONLLogger(Path(run_dir) / "metrics.jsonl"))
        if tensorboard:
            try:
                loggers.append(TensorBoardLogger(Path(run_dir) / "tb"))
            except ModuleNotFoundError as exc:  # optional: JSONL is always written
                _log.warning("%s; or set logging.tensorboard: false. Metrics still go to %s",
                             exc, Path(run_dir) / "metrics.jsonl")
    if wandb_project is not None:
        name = wandb_name or (Path(run_dir).name if run_dir is not None else None)
        extra = {"entity": wandb_entity} if wandb_entity else {}
        try:
            loggers.append(WandbLogger(wandb_project, config, name=name, run_dir=run_dir, **extra))
        except BaseException:
            for lg in loggers:
                lg.close()
            raise
    return MultiLogger(loggers)


class Progress:
    """A ``rich`` progress bar over training steps showing headline metrics.

    Args:
        total: steps to run; ``headline``: metric keys shown (missing ones are skipped).
        enabled: False makes it a no-op (tests, non-interactive runs still print nothing).
    """

    def __init__(self, total: int, headline: Iterable[str], enabled: bool = True,
                 start: int = 0) -> None:
        self.headline = list(headline)
        self.enabled = enabled
        self._bar: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        shown = [f"{k.split('/')[-2] + '/' if k.count('/') > 1 else ''}{k.split('/')[-1]}="
                 f"{metrics[k]:.3g}" for k in self.headline if k in metrics]
        self._bar.update(self._task, completed=step, info=" ".join(shown))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
