"""Metric loggers (JSONL, TensorBoard, W&B, null), the live ``rich`` progress bar and the
start-up phases printed before it (``Startup``).

Every logger has ``log(step, metrics)`` and ``close()``; the trainer calls them
unconditionally (use ``NullLogger`` to log nothing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
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


class Startup:
    """Start-up phases on stderr: what is being built now, then how long it took.

    ``with startup.phase("loading model s (tiny:xs)"): ...`` shows the phase (a spinner on a
    terminal, a ``... `` line otherwise) and then ``✓ loading model s (tiny:xs)  1.2 s``.

    Args:
        enabled: False makes it a no-op (a null object: callers never branch on it).
        console: where to write (default: a ``rich`` console on stderr).
    """

    def __init__(self, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled
        self._console = console

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Announce ``what``, run the block, print its wall time (nothing when disabled)."""
        if not self.enabled:
            yield
            return
        from rich.markup import escape

        console, t0 = self.console, time.perf_counter()
        if console.is_terminal:
            with console.status(what):
                yield
        else:
            console.print(f"{what} ...", markup=False, highlight=False)
            yield
        console.print(f"[green]✓[/green] {escape(what)}  [dim]{time.perf_counter() - t0:.1f} s",
                      highlight=False)


def headline_table(metrics: Mapping[str, float], *, eval_step: int | None = None) -> Any:
    """The metrics under the progress bar: one row per split (``train``, ``eval``...), each
    labelled, values ``agent/metric value``; rows wrap inside their column (80 columns fit).

    Args:
        metrics: headline keys ``<split>/<agent>/<metric>`` (e.g. ``train/speaker/success``).
        eval_step: the step the ``eval`` values were measured at (shown after them).
    """
    from rich.table import Table
    from rich.text import Text

    rows: dict[str, list[str]] = {}
    for key, value in metrics.items():
        split, _, name = key.partition("/")
        rows.setdefault(split, []).append(f"{name or split} {value:.3g}")
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for split, values in rows.items():
        when = f"  (step {eval_step})" if split == "eval" and eval_step is not None else ""
        table.add_row(Text(split), Text("  ".join(values) + when, style="dim" if when else ""))
    return table


class Progress:
    """A ``rich`` progress bar over training steps (on stderr) with the headline metrics under
    it: train and eval values on separately labelled rows, the last eval kept with its step.

    Args:
        total: steps to run; ``headline``: metric keys shown (missing ones are skipped).
        enabled: False makes it a no-op (tests, non-interactive runs still print nothing).
        start: the step the run starts from (a resumed run).
        console: where to draw (default: a ``rich`` console on stderr).
    """

    def __init__(self, total: int, headline: Iterable[str], enabled: bool = True,
                 start: int = 0, console: Any = None) -> None:
        self.headline = list(headline)
        self.enabled = enabled
        self.shown: dict[str, float] = {}  # headline values on display (eval: the last eval)
        self.eval_step: int | None = None
        self._bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            owner = self

            class _Bar(RichProgress):  # the bar, then the labelled metrics rows
                def get_renderables(self) -> Iterator[Any]:
                    yield self.make_tasks_table(self.tasks)
                    if owner.shown:
                        yield owner.renderable()

            self._bar = _Bar(TextColumn("[bold]step"), BarColumn(bar_width=36),
                             MofNCompleteColumn(), TimeElapsedColumn(),
                             console=console or Console(stderr=True))
            self._task = self._bar.add_task("train", total=total, completed=start)
            self._bar.start()

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Show step ``step``'s values; eval values stay until the next eval replaces them."""
        if self._bar is None:
            return
        new = {k: float(metrics[k]) for k in self.headline if k in metrics}
        if any(k.startswith("eval/") for k in new):
            self.shown = {k: v for k, v in self.shown.items() if not k.startswith("eval/")}
            self.eval_step = step
        self.shown.update(new)
        self._bar.update(self._task, completed=step)

    def renderable(self) -> Any:
        """The metrics rows as shown under the bar (``headline_table``), train rows first."""
        ordered = dict(sorted(self.shown.items(), key=lambda kv: (kv[0].startswith("eval/"),
                                                                  self.headline.index(kv[0]))))
        return headline_table(ordered, eval_step=self.eval_step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
