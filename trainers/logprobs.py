"""Chunked token log-probs and entropy from hidden states and the LM head (shared by backends).

Definition: log-probs and entropy are those of the distribution each token was *sampled from*,
exactly as the inference engine reports them (``areal_agents.engines.sampling``, vLLM's
``processed_logprobs`` convention): per row, logits divided by the row's temperature (greedy
rows: 1), then top-k, then top-p over the top-k set, renormalised over the kept tokens. AReaL
recomputes with temperature only, which is only right without top-k/top-p.

The kept set is a constant of the forward pass (no gradient flows through the cut-off), and the
label is always added to it: an on-policy generated token was drawn from the kept set, so this
changes nothing for it, while prompt tokens and tokens the current weights would have filtered
out get a finite log-prob (renormalised over kept set + label) instead of ``-inf``.

The full ``[tokens, vocab]`` log-softmax is never materialised: logits are computed
``chunk_size`` rows at a time, reduced to one log-prob and one entropy per row, and recomputed
chunk by chunk in the backward pass (a custom autograd function), in float32. Rows that filter
also sort their chunk's logits once in the forward (the per-row cut-off is saved, not the mask).
When the whole input is one chunk of at most ``SAVE_MAX_ELEMENTS`` logits and no row filters,
the forward keeps that chunk's log-softmax for the backward instead (the same values the
recompute would give, bit for bit, without a second LM-head matmul); peak memory is unchanged,
the buffer only lives until the backward.

``sequence_logprobs(..., positions=)`` pushes only the positions a loss reads through the LM
head (the train step passes the loss-mask tokens, ``trainers/step.py: loss_positions``).
"""

from __future__ import annotations

import torch

from areal_agents.engines.sampling import effective_temperature, keep_threshold
from areal_agents.samples import TokenBatch

DEFAULT_CHUNK_SIZE = 1024
SAVE_MAX_ELEMENTS = 1 << 24
"""Largest ``rows * vocab`` log-softmax (64 MiB in float32) kept from forward to backward."""


class RowSampling:
    """Per-row sampling parameters of the log-prob head: ``temperature [n]`` float32,
    ``top_k [n]`` long, ``top_p [n]`` float32 (rows are sequences or token rows, as the
    function taking it says).

    A plain class on purpose: FSDP2's mixed precision casts every floating tensor it finds in a
    module's forward arguments (through tuples, dicts and dataclasses) to the parameter dtype,
    which would round the temperatures to bf16; it leaves other objects alone.

    Example:
        >>> RowSampling.uniform(2, 0.5).temperature
        tensor([0.5000, 0.5000])
    """

    __slots__ = ("temperature", "top_k", "top_p")

    def __init__(self, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                 top_p: torch.Tensor | None = None) -> None:
        temperature = torch.as_tensor(temperature, dtype=torch.float32)
        if temperature.dim() != 1:
            raise ValueError(f"RowSampling.temperature must be 1-D [rows] "
                             f"(got shape {tuple(temperature.shape)})")
        if bool((temperature < 0).any()):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature.tolist()}")
        self.temperature = temperature
        self.top_k = (torch.zeros_like(temperature, dtype=torch.long) if top_k is None
                      else torch.as_tensor(top_k, dtype=torch.long, device=temperature.device))
        self.top_p = (torch.ones_like(temperature) if top_p is None
                      else torch.as_tensor(top_p, dtype=torch.float32, device=temperature.device))
        if self.top_k.shape != temperature.shape or self.top_p.shape != temperature.shape:
            raise ValueError(f"temperature, top_k and top_p need one entry per row (got shapes "
                             f"{tuple(temperature.shape)}, {tuple(self.top_k.shape)}, "
                             f"{tuple(self.top_p.shape)})")

    @classmethod
    def uniform(cls, n: int, temperature: float = 1.0,
                device: torch.device | str | None = None) -> RowSampling:
        """``n`` rows at ``temperature`` with no top-k/top-p."""
        return cls(torch.full((n,), float(temperature), dtype=torch.float32, device=device))

    @classmethod
    def of(cls, batch: TokenBatch) -> RowSampling:
        """The per-sequence parameters of ``batch`` (temperature 1, no filtering when unset)."""
        if batch.temperature is None:
            return cls.uniform(batch.batch_size, 1.0, batch.input_ids.device)
        return cls(batch.temperature, batch.top_k, batch.top_p)

    def to(self, device: torch.device | str) -> RowSampling:
        return RowSampling(self.temperature.to(device), self.top_k.to(device),
                           self.top_p.to(device))

    def __getitem__(self, index: torch.Tensor | slice) -> RowSampling:
        return RowSampling(self.temperature[index], self.top_k[index], self.top_p[index])

    def __len__(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def filters(self) -> bool:
        """Whether any non-greedy row uses top-k or top-p."""
        active = self.temperature > 0
        return bool((((self.top_k > 0) | (self.top_p < 1)) & active).any())

    def expand(self, keep: torch.Tensor) -> RowSampling:
        """Per-sequence ``[B]`` params repeated for the ``True`` entries of ``keep [B, T]``."""
        b, t = keep.shape
        return RowSampling(*(x[:, None].expand(b, t)[keep] for x in
                             (self.temperature, self.top_k, self.top_p)))


def as_row_sampling(sampling: RowSampling | torch.Tensor | float, n: int,
                    device: torch.device) -> RowSampling:
    """``sampling`` as a ``RowSampling`` of ``n`` rows on ``device`` (a float or a ``[n]``
    tensor is a temperature with no top-k/top-p)."""
    if isinstance(sampling, RowSampling):
        out = sampling
    elif isinstance(sampling, torch.Tensor):
        out = RowSampling(sampling)
    else:
        out = RowSampling.uniform(n, float(sampling))
    if len(out) != n:
        raise ValueError(f"sampling parameters have {len(out)} rows but the input has {n}")
    return out.to(device)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T / temp[:, None]`` in float32 (``[n, V]``)."""
    logits = hidden.float() @ weight.float().t()
    logits /= temp[:, None]
    return logits


def _dropped(logits: torch.Tensor, threshold: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` bool: tokens outside the kept set (the label is always kept)."""
    drop = logits < threshold[:, None]
    drop.scatter_(1, labels[:, None], False)
    return drop


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward and backward of ``(logp, entropy)`` chunk by chunk; see ``chunked_logprobs``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, top_k, top_p, chunk_size):  # type: ignore[override]
        n, dev = hidden.shape[0], hidden.device
        temp = effective_temperature(temperature)
        filters = RowSampling(temperature, top_k, top_p).filters
        logp, entropy, lse = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
        threshold = torch.full((n,), float("-inf"), device=dev) if filters else None
        keep_logp = not filters and n <= chunk_size and n * weight.shape[0] <= SAVE_MAX_ELEMENTS
        saved = None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = _chunk_logits(hidden[s:e], weight, temp[s:e])
            drop = None
            if threshold is not None:
                threshold[s:e] = keep_threshold(logits, temperature[s:e], top_k[s:e], top_p[s:e])
                drop = _dropped(logits, threshold[s:e], labels[s:e])
                logits.masked_fill_(drop, float("-inf"))
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            logits -= lse[s:e, None]  # in place: log-softmax without another [n, V] buffer
            logp[s:e] = logits.gather(-1, labels[s:e, None]).squeeze(-1)
            p = logits.exp()
            if drop is not None:
                logits.masked_fill_(drop, 0.0)  # p = 0 there: avoid 0 * -inf
            entropy[s:e] = -torch.linalg.vecdot(p, logits)  # fused multiply-sum
            if keep_logp:
                saved = logits  # the one chunk's log-softmax (no row filters: unmodified)
        ctx.save_for_backward(hidden, weight, labels, temp, threshold, lse, entropy, saved)
        ctx.set_materialize_grads(False)  # an unused output (often entropy) costs nothing
        ctx.chunk_size = chunk_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # type: ignore[override]
        hidden, weight, labels, temp, threshold, lse, entropy, saved = ctx.saved_tensors
        n = hidden.shape[0]
        none = (None,) * 5
        if grad_logp is None and grad_entropy is None:
            return None, None, *none
        w32 = weight.float()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_w = ctx.needs_input_grad[1]
        grad_weight = None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            # float32 also when backward() runs under autocast
            with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
                if saved is not None:  # one chunk, kept by the forward; never written to here
                    logp_all, drop = saved, None
                else:
                    logp_all = _chunk_logits(hidden[s:e], w32, temp[s:e])
                    drop = (None if threshold is None
                            else _dropped(logp_all, threshold[s:e], labels[s:e]))
                    logp_all -= lse[s:e, None]  # the forward's log-normaliser: no softmax again
                p = logp_all.exp()
                if drop is not None:
                    p.masked_fill_(drop, 0.0)  # the kept set is a constant: no gradient outside
                # z = logits / T:  d logp_y / dz = onehot(y) - p ;  d H / dz = -p * (log p + H)
                coef = torch.zeros(e - s, 1, device=hidden.device)
                if grad_logp is not None:
                    coef = coef + grad_logp[s:e, None].float()
                if grad_entropy is not None:
                    ent = entropy[s:e, None]
                    g_ent = grad_entropy[s:e, None].float()
                    # g_lp + g_H * (log p + H); out of place on the first op for ``saved``
                    buf = torch.add(logp_all, ent) if saved is not None else logp_all.add_(ent)
                    grad_z = buf.mul_(g_ent).add_(coef).mul_(p).neg_()
                else:
                    grad_z = p.mul_(-coef)
                if grad_logp is not None:
                    grad_z.scatter_add_(-1, labels[s:e, None], grad_logp[s:e, None].float())
                grad_z /= temp[s:e, None]
                del p
                if grad_hidden is not None:
                    grad_hidden[s:e] = (grad_z @ w32).to(hidden.dtype)
                if want_w and grad_weight is None:
                    grad_weight = grad_z.t() @ hidden[s:e].float()
                elif want_w:
                    grad_weight.addmm_(grad_z.t(), hidden[s:e].float())
        if want_w:
            grad_weight = torch.zeros_like(w32) if grad_weight is None else grad_weight
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, *none


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sampling: RowSampling | torch.Tensor | float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy under the sampling distribution of each row.

    Args:
        hidden: ``[n, hidden]`` final hidden states (any float dtype).
        weight: ``[vocab, hidden]`` LM-head weight (no bias).
        labels: ``[n]`` long, the token each row predicts.
        sampling: per-row ``RowSampling`` (``[n]`` entries), or one temperature for every row
            (a float, or a ``[n]`` tensor) with no top-k/top-p. Temperature 0 (greedy) means
            temperature 1 and no filtering, as the engines report it.
        chunk_size: rows per chunk; peak extra memory is ``O(chunk_size * vocab)``.

    Returns:
        ``(logprobs [n], entropy [n])`` in float32, differentiable w.r.t. ``hidden`` and
        ``weight``.

    Raises:
        ValueError: negative temperature, non-positive chunk size, or mismatched shapes.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0 (got {chunk_size})")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)} must be [n, h], labels "
            f"{tuple(labels.shape)} [n], weight {tuple(weight.shape)} [vocab, h]"
        )
    rows = as_row_sampling(sampling, hidden.shape[0], hidden.device)
    # float32 even under an enclosing bf16 autocast (it would move every log-prob by ~1e-2)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLogprobs.apply(hidden, weight, labels.long(), rows.temperature,
                                      rows.top_k, rows.top_p, chunk_size)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: RowSampling | torch.Tensor | float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropy aligned with ``input_ids`` (``areal_agents.samples``).

    ``out[b, t]`` is log p(input_ids[b, t] | input_ids[b, :t]) under sequence b's sampling
    distribution; position 0 and padded positions are 0. Only real tokens (and, with
    ``positions``, only the wanted ones) are pushed through the LM head.

    Args:
        hidden: ``[B, T, h]`` final hidden states.
        weight: ``[vocab, h]`` LM-head weight.
        input_ids: ``[B, T]`` long.
        attention_mask: ``[B, T]`` bool/int, right padded.
        sampling: per-sequence ``RowSampling`` (``[B]``, e.g. ``RowSampling.of(batch)``), or
            one temperature (float, or ``[B]`` tensor) with no top-k/top-p.
        chunk_size: rows per chunk of the LM-head computation.
        positions: ``[B, T]`` bool/int, the positions whose values are wanted (others are 0,
            as padding); ``None``: every real token. A loss that reads only its loss-mask
            tokens gets the same values there for a fraction of the LM-head work.

    Returns:
        ``(logprobs [B, T], entropy [B, T])`` float32.
    """
    b, t = input_ids.shape
    keep = attention_mask[:, 1:].bool()  # [B, T-1]: positions 1.. that are real tokens
    if positions is not None:
        keep = keep & positions[:, 1:].bool()
    rows = hidden[:, :-1][keep]  # [n, h]
    labels = input_ids[:, 1:][keep]
    per_row = as_row_sampling(sampling, b, hidden.device).expand(keep)
    logp, ent = chunked_logprobs(rows, weight, labels, per_row, chunk_size)
    out_lp = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
    out_ent = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
    index = keep.nonzero(as_tuple=True)
    out_lp = out_lp.index_put((index[0], index[1] + 1), logp)
    out_ent = out_ent.index_put((index[0], index[1] + 1), ent)
    return out_lp, out_ent


def full_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    sampling: RowSampling | torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (unchunked, plain autograd) version of ``sequence_logprobs`` from
    ``[B, T, vocab]`` logits, written directly from the definition in the module docstring."""
    b, t, v = logits.shape
    rows = as_row_sampling(sampling, b, logits.device)
    temp = effective_temperature(rows.temperature)[:, None, None]
    scaled = (logits.float() / temp)[:, :-1]  # [B, T-1, V]
    labels = input_ids[:, 1:]
    per_pos = rows.expand(torch.ones(b, t - 1, dtype=torch.bool, device=logits.device))
    flat = scaled.reshape(-1, v)
    with torch.no_grad():
        threshold = keep_threshold(flat.detach(), per_pos.temperature, per_pos.top_k, per_pos.top_p)
        drop = _dropped(flat.detach(), threshold, labels.reshape(-1))
    logp_all = torch.log_softmax(flat.masked_fill(drop, float("-inf")), dim=-1)
    lp = logp_all.gather(-1, labels.reshape(-1, 1)).reshape(b, t - 1)
    ent = -(logp_all.exp() * logp_all.masked_fill(drop, 0.0)).sum(-1).reshape(b, t - 1)
    mask = attention_mask[:, 1:].float()
    zero = torch.zeros_like(input_ids[:, :1], dtype=torch.float32)
    return torch.cat([zero, lp * mask], 1), torch.cat([zero, ent * mask], 1)

