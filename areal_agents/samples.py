"""Token-level training data: ``Sample`` (one sequence) and ``TokenBatch`` (padded tensors).

Alignment convention, used by engines, the gateway, algorithms and every training backend:
per-token arrays are aligned with ``token_ids``. ``logprobs[t]`` is log p(token_ids[t] | tokens
before t) under the behaviour policy, ``versions[t]`` the policy version that sampled token t,
and ``loss_mask[t] == 1`` exactly for tokens the policy generated. Prompt / observation tokens
have ``loss_mask 0``, ``logprobs 0.0`` and ``versions -1``.

Log-prob definition: behaviour log-probs are taken under the distribution the token was drawn
from (temperature, then top-k, then top-p; ``areal_agents.engines.sampling``). Each ``Sample``
carries those parameters (``SamplingDistribution``) and ``collate`` puts them per row into the
``TokenBatch``, so every training backend recomputes log-probs under the same definition.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingDistribution:
    """The sampling parameters that define a sample's log-probs.

    Log-probs follow vLLM's ``processed_logprobs`` convention: the log-prob of a token under the
    distribution it was actually sampled from -- logits divided by ``temperature``, then
    ``top_k``, then ``top_p`` over the kept set, renormalised (see
    ``areal_agents.engines.sampling``). AReaL recomputes training log-probs with temperature
    only; here the trainer applies all three, so on-policy importance ratios are exactly 1.

    Greedy decoding (``temperature == 0``) reports temperature-1 log-probs with no filtering;
    ``top_k``/``top_p`` are normalised to their disabled values for it.

    Attributes:
        temperature: >= 0; 0 means greedy.
        top_k: keep the k most likely tokens; 0 disables it.
        top_p: nucleus mass in (0, 1]; 1 disables it.

    Example:
        >>> SamplingDistribution(temperature=0.7, top_p=0.9)
        SamplingDistribution(temperature=0.7, top_k=0, top_p=0.9)
        >>> SamplingDistribution(temperature=0, top_k=5)  # greedy: nothing is filtered
        SamplingDistribution(temperature=0.0, top_k=0, top_p=1.0)
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"SamplingDistribution.temperature must be >= 0 (0 = greedy), "
                             f"got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingDistribution.top_k must be >= 0 (0 disables it), "
                             f"got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingDistribution.top_p must be in (0, 1], got {self.top_p}")
        greedy = self.temperature == 0
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", 0 if greedy else int(self.top_k))
        object.__setattr__(self, "top_p", 1.0 if greedy else float(self.top_p))


@dataclass
class Sample:
    """One training sequence of one agent (a merged multi-turn conversation or a single turn).

    Attributes:
        token_ids: the exact ids the engine saw and produced (never re-tokenized).
        loss_mask: 1 on generated tokens, 0 elsewhere; same length as ``token_ids``.
        logprobs: behaviour log-probs of generated tokens (0.0 elsewhere).
        versions: policy version per generated token (-1 elsewhere).
        reward: the sequence's scalar reward (the agent's episode return unless shaped).
        agent: the agent id (role) that produced it.
        policy: the policy name that produced it.
        group: the group key for group-relative advantages (task seed; role is added by the
            algorithms).
        meta: free-form diagnostics (episode id, turn indices, split reason...).
        sampling: the parameters the generated tokens were sampled with (they define
            ``logprobs``); None when not recorded (demonstrations, hand-built samples):
            ``collate`` then uses its ``temperature`` argument.
        token_rewards: per-turn (process) rewards as ``{position: reward}``, each on a
            generated token (a turn's last one); PPO's GAE uses them instead of ``reward`` on
            the last generated token. ``reward`` stays the scalar for group-relative
            algorithms. None: no per-turn rewards.
    """

    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    reward: float = 0.0
    agent: str = ""
    policy: str = ""
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingDistribution | None = None
    token_rewards: dict[int, float] | None = None

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("loss_mask", "logprobs", "versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Sample.{name} has {len(getattr(self, name))} entries but token_ids has {n}; "
                    "every per-token array must align with token_ids"
                )
        for pos in self.token_rewards or {}:
            if not (0 <= pos < n and self.loss_mask[pos]):
                raise ValueError(
                    f"Sample.token_rewards has a reward at position {pos}, which is not a "
                    f"generated token (the sample has {n} tokens); put each turn's reward on "
                    "that turn's last generated token"
                )

    def add_reward(self, value: float) -> None:
        """Add ``value`` to the sequence's reward after the episode (e.g. a group judge's):
        to ``reward`` and, with per-turn rewards, to the last generated token's entry, so
        ``token_rewards`` keep summing to what GAE must see."""
        self.reward += value
        if self.token_rewards is not None:
            last = max(i for i, m in enumerate(self.loss_mask) if m)
            self.token_rewards[last] = self.token_rewards.get(last, 0.0) + value

    @property
    def num_generated(self) -> int:
        """Number of tokens under the loss mask."""
        return int(sum(self.loss_mask))

    def __len__(self) -> int:
        return len(self.token_ids)

    def _repr_html_(self, max_tokens: int = 64) -> str:
        """Who produced it, its reward, and its last ``max_tokens`` positions as a table (ids,
        loss mask, behaviour log-probs coloured as in ``areal-agents view``, versions)."""
        from .viewer import logprob_colour

        n, start = len(self), max(0, len(self) - max_tokens)
        shown = range(start, n)

        def row(name: str, cell: Any) -> str:
            return f"<tr><th>{name}</th>{''.join(cell(i) for i in shown)}</tr>"

        def logprob(i: int) -> str:
            if not self.loss_mask[i]:
                return "<td></td>"
            return (f'<td style="background:{logprob_colour(self.logprobs[i])}">'
                    f"{self.logprobs[i]:.2f}</td>")

        generated = [v for v, m in zip(self.versions, self.loss_mask, strict=True) if m]
        span = f", versions {min(generated)}..{max(generated)}" if generated else ""
        return (f"<div><b>Sample</b> agent={html.escape(self.agent)} policy="
                f"{html.escape(self.policy)} group={html.escape(self.group)} "
                f"reward={self.reward:.3g}; {n} tokens, {self.num_generated} generated{span}"
                f"{f'; positions {start}..{n - 1} shown' if start else ''}<table>"
                f"{row('position', lambda i: f'<td>{i}</td>')}"
                f"{row('token id', lambda i: f'<td>{self.token_ids[i]}</td>')}"
                f"{row('loss mask', lambda i: f'<td>{self.loss_mask[i]}</td>')}"
                f"{row('log-prob', logprob)}"
                f"{row('version', lambda i: f'<td>{self.versions[i]}</td>')}</table></div>")


@dataclass
class TokenBatch:
    """A right-padded batch of samples as tensors, all ``[batch, seq]`` unless noted.

    ``loss_weights`` is set by the algorithm so that a micro-batch's loss is
    ``sum(per_token_loss * loss_weights)`` and micro-batch losses add up to the batch loss
    (the aggregation mode lives in the weights). ``stat_weights`` (set by the algorithm too) are
    the batch-global token-mean weights ``loss_mask / N``: every logged ratio-like statistic is
    ``sum(x * stat_weights)``, a plain per-token mean whatever the loss aggregation, and adds up
    over micro-batches the same way. Optional fields are None when unused.

    ``temperature``/``top_k``/``top_p`` are the per-row sampling parameters that define
    ``old_logprobs`` (``SamplingDistribution``); every backend recomputes log-probs under them.
    None means temperature 1 and no filtering for every row.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] bool
    loss_mask: torch.Tensor  # [B, T] float
    old_logprobs: torch.Tensor  # [B, T] float: behaviour log-probs
    versions: torch.Tensor  # [B, T] long
    rewards: torch.Tensor  # [B] float
    advantages: torch.Tensor | None = None  # [B, T]
    prox_logprobs: torch.Tensor | None = None  # [B, T]: proximal policy (recomputed)
    ref_logprobs: torch.Tensor | None = None  # [B, T]: reference policy
    values: torch.Tensor | None = None  # [B, T]: critic values (PPO/GAE)
    returns: torch.Tensor | None = None  # [B, T]
    token_rewards: torch.Tensor | None = None  # [B, T]: per-turn rewards (Sample.token_rewards)
    loss_weights: torch.Tensor | None = None  # [B, T]
    stat_weights: torch.Tensor | None = None  # [B, T]: loss_mask / generated tokens of the batch
    temperature: torch.Tensor | None = None  # [B] float: each row's sampling temperature
    top_k: torch.Tensor | None = None  # [B] long: each row's top-k (0 = off)
    top_p: torch.Tensor | None = None  # [B] float: each row's top-p (1 = off)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum())

    def _repr_html_(self) -> str:
        """Shapes, token counts, rewards and the optional fields set, for notebooks."""
        rows = "".join(
            f"<tr><td>{f.name}</td><td>{tuple(v.shape)}</td><td>{str(v.dtype)[6:]}</td></tr>"
            for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor))
        rewards = ", ".join(f"{r:.3g}" for r in self.rewards.tolist()[:16])
        more = ", ..." if self.batch_size > 16 else ""
        return (f"<div><b>TokenBatch</b> {self.batch_size} rows, {self.num_tokens} tokens, "
                f"{int(self.loss_mask.sum())} trained; rewards [{rewards}{more}]"
                f"<table><tr><th>field</th><th>shape</th><th>dtype</th></tr>{rows}</table></div>")

    def select(self, index: torch.Tensor | Sequence[int]) -> TokenBatch:
        """Rows ``index`` of every tensor field (a micro-batch); trims trailing padding."""
        idx = torch.as_tensor(index, dtype=torch.long)
        width = int(self.attention_mask[idx].sum(-1).max()) if len(idx) else 0
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[idx]
                if v.dim() == 2:
                    v = v[:, :width]
            out[f.name] = v
        return TokenBatch(**out)

    def to(self, device: torch.device | str) -> TokenBatch:
        """A copy with every tensor on ``device``."""
        out = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return TokenBatch(**out)


def collate(samples: Sequence[Sample], pad_token_id: int = 0,
            temperature: float | None = None) -> TokenBatch:
    """Right-pad ``samples`` into a ``TokenBatch`` (advantages etc. left None).

    Each row's ``temperature``/``top_k``/``top_p`` come from its sample's ``sampling``. Samples
    without recorded params (``sampling is None``) use ``temperature`` (default 1.0) and no
    top-k/top-p. When any sample has ``token_rewards``, ``token_rewards`` is ``[B, T]``: those
    rewards at their positions, and for rows without them ``reward`` on the last generated
    token; otherwise it is None.

    Args:
        samples: the sequences, in row order.
        pad_token_id: the id written into padding positions.
        temperature: the sampling temperature of samples that record none.

    Raises:
        ValueError: ``samples`` is empty, or ``temperature`` is given and contradicts a
            sample's recorded temperature.
    """
    if not samples:
        raise ValueError("collate() got no samples; a batch needs at least one")
    width = max(len(s) for s in samples)
    lengths = torch.tensor([len(s) for s in samples])
    # one tensor build per field from padded Python rows (a per-row tensor and slice
    # assignment cost ~10 us each: 4 fields x B rows per batch)
    input_ids = _padded([s.token_ids for s in samples], width, pad_token_id, torch.long)
    attention = torch.arange(width)[None, :] < lengths[:, None]
    loss_mask = _padded([s.loss_mask for s in samples], width, 0, torch.float32)
    logprobs = _padded([s.logprobs for s in samples], width, 0.0, torch.float32)
    versions = _padded([s.versions for s in samples], width, -1, torch.long)
    fallback = SamplingDistribution(1.0 if temperature is None else temperature)
    params = []
    for i, s in enumerate(samples):
        if (s.sampling is not None and temperature is not None
                and s.sampling.temperature != fallback.temperature):
            raise ValueError(
                f"collate(temperature={temperature}) but sample {i} was sampled at temperature "
                f"{s.sampling.temperature}; drop the temperature argument (recorded samples "
                "carry their own sampling parameters)")
        params.append(s.sampling or fallback)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    return TokenBatch(
        input_ids, attention, loss_mask, logprobs, versions, rewards,
        token_rewards=_token_rewards(samples, width),
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
    )


def _padded(rows: Sequence[Sequence[float]], width: int, fill: float,
            dtype: torch.dtype) -> torch.Tensor:
    """``[len(rows), width]``: each row right-padded with ``fill``."""
    return torch.tensor([[*row, *[fill] * (width - len(row))] for row in rows], dtype=dtype)


def _token_rewards(samples: Sequence[Sample], width: int) -> torch.Tensor | None:
    """``[B, width]`` per-token rewards, or None when no sample has ``token_rewards``."""
    if all(s.token_rewards is None for s in samples):
        return None
    out = torch.zeros((len(samples), width))
    for i, s in enumerate(samples):
        if s.token_rewards is not None:
            for pos, r in s.token_rewards.items():
                out[i, pos] += r
        elif s.num_generated:
            out[i, max(t for t, m in enumerate(s.loss_mask) if m)] = s.reward
    return out
