"""Which dataset row a task seed picks: a seeded shuffle, a held-out eval split, seed ranges."""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from areal_agents.errors import ConfigError

Split = Literal["seed", "train", "eval", "all"]
SPLITS: tuple[str, ...] = ("seed", "train", "eval", "all")


@dataclasses.dataclass(frozen=True)
class SeedSplit:
    """Maps task seeds to row indices, keeping eval rows apart from train rows.

    The rows are shuffled once by ``shuffle_seed``; the first ``num_eval`` of that order are
    the eval rows, the rest the train rows. Then, by ``split``:

    * ``"train"``: seed ``s`` is train row ``s mod num_train`` of a per-epoch reshuffle
      (epoch ``s // num_train``), so consecutive seeds are not consecutive rows and each
      epoch visits every train row once.
    * ``"eval"``: seed ``s`` is eval row ``s mod num_eval`` (no reshuffle).
    * ``"seed"``: seeds below ``eval_seed_start`` act as ``"train"``; seed
      ``eval_seed_start + i`` is eval row ``i mod num_eval``. One env then serves a trainer's
      training seeds (0, 1, ...) and its eval seeds (``range(1_000_000, ...)`` by default)
      without an eval seed ever reaching a train row.
    * ``"all"``: no held-out rows; seed ``s`` cycles over every row like ``"train"``.

    Example:
        >>> split = SeedSplit(num_rows=10, num_eval=2)
        >>> train = {split.row(s, "train") for s in range(100)}
        >>> evals = {split.row(1_000_000 + i, "seed") for i in range(100)}
        >>> len(train), len(evals), train & evals
        (8, 2, set())
    """

    num_rows: int
    num_eval: int
    shuffle_seed: int = 0
    eval_seed_start: int = 1_000_000

    def __post_init__(self) -> None:
        if self.num_rows < 1:
            raise ConfigError("a dataset env needs at least one row")
        if self.eval_seed_start < 0:
            raise ConfigError(f"eval_seed_start must be >= 0, got {self.eval_seed_start}")
        if not 0 <= self.num_eval < self.num_rows:
            raise ConfigError(
                f"the eval split takes {self.num_eval} of {self.num_rows} rows, leaving none to "
                "train on; lower eval_size/eval_fraction (or use split='all' with no eval rows)"
            )

    @functools.cached_property
    def _order(self) -> np.ndarray:
        return np.random.default_rng(self.shuffle_seed).permutation(self.num_rows)

    @property
    def eval_rows(self) -> list[int]:
        """The held-out row indices, in the order eval seeds visit them."""
        return [int(i) for i in self._order[: self.num_eval]]

    @property
    def train_rows(self) -> list[int]:
        """The train row indices (every row that is not an eval row), unordered."""
        return sorted(int(i) for i in self._order[self.num_eval :])

    def _cycle(self, rows: np.ndarray, seed: int) -> int:
        epoch, position = divmod(seed, len(rows))
        reshuffle = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(rows))
        return int(rows[reshuffle[position]])

    def row(self, seed: int, split: Split) -> int:
        """The row index of task seed ``seed`` (``seed >= 0``) under ``split``.

        Raises:
            ConfigError: an eval seed with no eval rows (set eval_size or eval_fraction).
        """
        if split == "all":
            return self._cycle(self._order, seed)
        if split == "seed" and seed >= self.eval_seed_start:
            split, seed = "eval", seed - self.eval_seed_start
        if split == "eval":
            if self.num_eval == 0:
                raise ConfigError(
                    "an eval seed was asked for but the eval split is empty; set eval_size or "
                    f"eval_fraction > 0 (eval seeds start at eval_seed_start={self.eval_seed_start})"
                )
            return int(self._order[seed % self.num_eval])
        return self._cycle(self._order[self.num_eval :], seed)

    def random_seed(self, rng: np.random.Generator, split: Split) -> int:
        """A seed of ``split`` drawn from ``rng`` (for ``reset(seed=None)``); ``"seed"``
        draws a training seed."""
        high = self.eval_seed_start if split == "seed" else 2**31 - 1
        return int(rng.integers(high))


def eval_count(num_rows: int, eval_fraction: float, eval_size: int | None) -> int:
    """How many rows are held out: ``eval_size`` when given, else ``round(eval_fraction *
    num_rows)`` but at least 1 when ``eval_fraction > 0``.

    Raises:
        ConfigError: a fraction outside ``[0, 1)`` or a negative size.
    """
    if eval_size is not None:
        if eval_size < 0:
            raise ConfigError(f"eval_size must be >= 0, got {eval_size}")
        return eval_size
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    return max(1, round(eval_fraction * num_rows)) if eval_fraction > 0 else 0
