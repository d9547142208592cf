"""Reading dataset rows (JSONL, JSON, Parquet, a list of dicts, a ``datasets.Dataset``), with
errors that name the file, the line and the fix."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from areal_agents.errors import ConfigError
from areal_agents.extras import require

Source = str | os.PathLike[str] | Iterable[Mapping[str, Any]]


@dataclasses.dataclass
class Rows:
    """Loaded rows and where each came from.

    Attributes:
        rows: the rows, as plain dicts.
        origin: the source for messages: a path, ``"rows"`` or ``"dataset"``.
        lines: for JSONL files, the 1-based line number of each row (blank lines skipped).
    """

    rows: list[dict[str, Any]]
    origin: str
    lines: list[int] | None = None

    def where(self, index: int) -> str:
        """``data.jsonl:7`` (a JSONL line), ``data.parquet row 3`` or ``rows[3]``."""
        if self.lines is not None:
            return f"{self.origin}:{self.lines[index]}"
        if self.origin in ("rows", "dataset"):
            return f"{self.origin}[{index}]"
        return f"{self.origin} row {index}"


def load_rows(source: Source) -> Rows:
    """Read every row of ``source``.

    Args:
        source: a ``.jsonl`` file (one JSON object per line), a ``.json`` file (a list of
            objects), a ``.parquet`` file (needs ``pyarrow``), a list of dicts, or a Hugging
            Face ``datasets.Dataset``.

    Raises:
        ConfigError: no such file, an unknown suffix, a line that is not a JSON object, a
            row that is not a mapping, no rows at all, or a ``DatasetDict`` (pick a split).
    """
    if isinstance(source, str | os.PathLike):
        loaded = _load_file(Path(source))
    else:
        kind = type(source).__name__
        if kind in ("DatasetDict", "IterableDatasetDict"):
            raise ConfigError(
                f"got a {kind} with splits {sorted(source)}; pass one split, "  # type: ignore[arg-type]
                "e.g. dataset['train']"
            )
        origin = "dataset" if kind == "Dataset" else "rows"
        loaded = Rows([_as_row(r, f"{origin}[{i}]") for i, r in enumerate(source)], origin)
    if not loaded.rows:
        raise ConfigError(f"{loaded.origin}: no rows; a dataset env needs at least one task")
    return loaded


def _as_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of field -> value, got {type(row).__name__}"
        )
    return dict(row)


def _load_file(path: Path) -> Rows:
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such data file (relative paths start at the current directory "
            f"{Path.cwd()}); check env_kwargs.path"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), f"{path}")
        if not isinstance(data, list):
            raise ConfigError(
                f"{path}: a .json data file must hold a list of objects, got "
                f"{type(data).__name__}; use one object per line in a .jsonl file instead"
            )
        return Rows([_as_row(r, f"{path} item {i}") for i, r in enumerate(data)], str(path))
    if suffix == ".parquet":
        pq = require("pyarrow.parquet", "datasets", f"reading {path}")
        return Rows(pq.read_table(path).to_pylist(), str(path))
    raise ConfigError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .parquet")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc}); fix or remove it") from None


def _load_jsonl(path: Path) -> Rows:
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            value = _json(line, where)
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected one JSON object per line, got {type(value).__name__}; "
                    'write each task as {"question": ..., "answer": ...}'
                )
            rows.append(value)
            lines.append(number)
    if not rows:
        raise ConfigError(
            f"{path}: the file is empty; a .jsonl data file needs one JSON object per line"
        )
    return Rows(rows, str(path), lines)
