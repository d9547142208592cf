"""Reading dataset rows (JSONL, JSON, Parquet, a list of dicts, a ``datasets.Dataset``) and
turning them into ``(prompt, answer)`` tasks, with errors that name the file, the line and the
fix."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
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


def render_prompt(template: str, row: dict[str, Any]) -> str:
    """The prompt of ``row``: ``template.format(**row)`` when ``template`` has a ``{``, else
    the field named ``template``.

    Raises:
        KeyError: a field the template needs is missing from the row.
    """
    if "{" not in template:
        return str(row[template])
    return template.format(**row)


@functools.lru_cache(maxsize=8)
def file_tasks(
    key: tuple[str, int, int], template: str, answer_field: str, answer_pattern: str | None
) -> tuple[Rows, tuple[str, ...], tuple[Any, ...]]:
    """A data file's rows and tasks, keyed by ``(path, mtime_ns, size)``: read once per
    version of the file and options, shared (read-only) by the envs built from it."""
    data = load_rows(key[0])
    return (data, *tasks_of(data, template, answer_field, answer_pattern))


def tasks_of(
    data: Rows, template: str, answer_field: str, answer_pattern: str | None
) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """``(prompts, answers)`` of every row, with a ConfigError naming the first bad row."""
    pattern = re.compile(answer_pattern) if answer_pattern is not None else None
    prompts, answers = [], []
    for i, row in enumerate(data.rows):
        fields = ", ".join(map(repr, row)) or "none"
        try:
            prompts.append(render_prompt(template, row))
        except KeyError as exc:
            raise ConfigError(
                f"{data.where(i)}: no field {exc} for prompt_template {template!r} (fields: "
                f"{fields}); fix the row or set prompt_template to use these fields"
            ) from None
        except (IndexError, ValueError) as exc:
            raise ConfigError(
                f"prompt_template {template!r} is not a valid format: {exc}"
            ) from None
        if row.get(answer_field) is None:
            what = "is null" if answer_field in row else "is missing"
            raise ConfigError(
                f"{data.where(i)}: the answer field {answer_field!r} {what} (fields: {fields}); "
                "fix the row or set answer_field to the field holding the answer"
            )
        answer = row[answer_field]
        if pattern is not None:
            found = pattern.search(str(answer))
            if found is None:
                raise ConfigError(
                    f"{data.where(i)}: answer_pattern {answer_pattern!r} not found in "
                    f"{answer_field!r}; fix the row or the pattern"
                )
            answer = (found.group(1) if pattern.groups else found.group(0)).strip()
        answers.append(answer)
    return tuple(prompts), tuple(answers)
