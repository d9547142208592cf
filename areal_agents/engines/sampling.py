"""Batched token sampling with per-row temperature, top-k, top-p and per-request generators.

This module is the one home of the log-prob definition used everywhere (engines, gateway
samples, trainers): **the log-prob of a token is taken under the distribution it was sampled
from** -- vLLM's ``logprobs_mode="processed_logprobs"`` convention. Per row:

1. divide the logits by the temperature (greedy rows, temperature 0, use temperature 1 and no
   filtering, so they report temperature-1 log-probs);
2. top-k keeps the k largest scaled logits (0 disables it);
3. top-p keeps, *within the top-k set* (renormalised), the smallest prefix by descending
   probability whose mass reaches ``top_p`` (1 disables it); ties at a cut-off are kept;
4. ``log_softmax`` over the kept tokens; filtered tokens are ``-inf``.

``keep_threshold`` states steps 2-3 as one number per row (a token is kept iff its scaled logit
is ``>= threshold``), so the trainers' chunked log-prob head (``trainers/logprobs.py``) applies
exactly this rule without materialising a second copy of it. AReaL, by contrast, recomputes
training log-probs with temperature only (no top-k/top-p), which differs from the behaviour
log-probs whenever filtering is on.

``sample`` filters and draws for the whole batch at once: each sampled row inverts its CDF at
one uniform from its own generator (``draw``), so no torch op runs per row and a seeded row's
tokens do not depend on what shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import EngineError


@dataclass
class SampledTokens:
    """The result of sampling one token for each row of a batch.

    Attributes:
        token_ids: ``[batch]`` sampled ids.
        logprobs: ``[batch]`` log-prob of each sampled id under the distribution it was drawn
            from (after temperature, top-k, top-p); greedy rows report the temperature-1 log-prob.
        top_ids / top_logprobs: ``[batch, k]`` the k most likely ids of that same distribution
            (None when ``k == 0``).
    """

    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def effective_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """``temperature`` with greedy rows (0) replaced by 1 (their log-probs are temperature-1)."""
    return torch.where(temperature > 0, temperature, torch.ones_like(temperature))


def keep_threshold(scaled: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest scaled logit that stays in the sampling set (steps 2-3 above).

    Args:
        scaled: ``[batch, vocab]`` float32 logits already divided by
            ``effective_temperature(temperature)``.
        temperature: ``[batch]`` raw temperatures (0 = greedy: nothing is filtered).
        top_k: ``[batch]`` ints, 0 disables; top_p: ``[batch]`` in (0, 1], 1 disables.

    Returns:
        ``[batch]`` thresholds: token v of row b is kept iff ``scaled[b, v] >= threshold[b]``;
        ``-inf`` where the row filters nothing.
    """
    greedy = temperature == 0
    use_k = (top_k > 0) & ~greedy
    use_p = (top_p < 1) & ~greedy
    threshold = torch.full(scaled.shape[:1], float("-inf"), dtype=scaled.dtype,
                           device=scaled.device)
    if not (bool(use_k.any()) or bool(use_p.any())):
        return threshold
    sorted_logits, _ = torch.sort(scaled, dim=-1, descending=True)
    if bool(use_k.any()):
        k = top_k.clamp(min=1, max=scaled.shape[-1]) - 1
        kth = sorted_logits.gather(1, k[:, None]).squeeze(1)
        threshold = torch.where(use_k, kth, threshold)
    if bool(use_p.any()):
        # restrict to the top-k set first, then keep the smallest prefix with mass >= top_p
        ranked = torch.where(sorted_logits >= threshold[:, None], sorted_logits,
                             torch.full_like(sorted_logits, float("-inf")))
        probs = torch.softmax(ranked, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep = mass_before < top_p[:, None]
        last_kept = keep.sum(dim=-1).clamp(min=1) - 1
        pth = sorted_logits.gather(1, last_kept[:, None]).squeeze(1)
        threshold = torch.where(use_p, torch.maximum(threshold, pth), threshold)
    return threshold


def processed_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Log-probs of the sampling distribution of each row (the module's definition).

    Args:
        logits: ``[batch, vocab]`` float32 logits.
        temperature: ``[batch]``; rows with 0 (greedy) use temperature 1 and no filtering.
        top_k: ``[batch]`` ints, 0 disables; top_p: ``[batch]`` in (0, 1], 1 disables.

    Returns:
        ``[batch, vocab]`` log-probs; filtered-out tokens are ``-inf``.
    """
    scaled = logits / effective_temperature(temperature)[:, None]
    threshold = keep_threshold(scaled, temperature, top_k, top_p)
    scaled = torch.where(scaled >= threshold[:, None], scaled, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


RowGenerator = random.Random | torch.Generator
"""A sampled row's own random stream: ``random.Random`` (what ``LocalEngine`` gives each row:
drawing from it is plain Python, no torch op per row) or a ``torch.Generator``."""


def row_uniforms(generators: list[RowGenerator | None], device: torch.device) -> torch.Tensor:
    """``[batch]`` float64 uniforms in [0, 1), one drawn from each row's own generator.

    ``random.Random`` rows call ``.random()`` (53 random bits); ``torch.Generator`` rows draw one
    float64 ``torch.rand``; rows with ``None`` share one ``torch.rand`` from torch's global
    generator of ``device``. One tensor is built from the values (a single torch op when every
    row has a ``random.Random``).
    """
    num_global = sum(g is None for g in generators)
    shared = iter(torch.rand(num_global, dtype=torch.float64, device=device).tolist()
                  if num_global else ())
    values = [next(shared) if g is None else
              torch.rand((), generator=g, dtype=torch.float64, device=g.device).item()
              if isinstance(g, torch.Generator) else g.random() for g in generators]
    return torch.tensor(values, dtype=torch.float64, device=device)


def draw(probs: torch.Tensor, generators: list[RowGenerator | None]) -> torch.Tensor:
    """One id per row of ``probs`` (``[batch, vocab]``, rows summing to ~1), drawn by inverting
    each row's CDF at one uniform number from that row's generator (``row_uniforms``).

    A seeded row draws the same ids whatever else shares the batch; the CDFs of all rows are
    inverted together (one float64 ``cumsum`` and one ``searchsorted``). A token of probability
    0 is never drawn: the CDF does not rise at it. Costs one uniform per row instead of the
    exponential-race noise over the whole vocabulary that ``torch.multinomial(row, 1)`` draws
    for every row, and no torch op per row.

    Raises:
        EngineError: a row has no finite positive mass (the model produced NaN or inf logits).
    """
    u = row_uniforms(generators, probs.device)  # [batch]
    cdf = torch.cumsum(probs.double(), dim=-1)  # [batch, vocab]
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        raise EngineError(f"cannot sample rows {bad.nonzero().flatten().tolist()}: their "
                          "probabilities are NaN, inf or all zero (the model produced non-finite "
                          "logits; check the weights last pushed to the engine)")
    # below the row's total, so the first CDF entry above it is a token of positive mass
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # [batch]
    # a parallel (GPU) cumsum may round a flat step up; never return a filtered token
    positive = probs.gather(1, ids[:, None]).squeeze(1) > 0
    return torch.where(positive, ids, probs.argmax(dim=-1))


def _unfiltered_logprobs(logits: torch.Tensor, temperature: list[float]) -> torch.Tensor:
    """``processed_logprobs`` for rows that filter nothing, in fewer torch ops: no division
    when every effective temperature is 1 (``x / 1`` is ``x``), no threshold search; NaN logits
    are still treated as filtered, as ``scaled >= -inf`` does there: ``nan_to_num`` replaces
    NaN by ``-inf`` and keeps every other value (infinities included), the same bits as that
    ``where`` in one cheap op."""
    scaled = logits
    if any(t not in (0.0, 1.0) for t in temperature):
        temp = torch.tensor(temperature, dtype=torch.float32, device=logits.device)
        scaled = logits / effective_temperature(temp)[:, None]
    inf = float("inf")
    scaled = torch.nan_to_num(scaled, nan=-inf, posinf=inf, neginf=-inf)
    return torch.log_softmax(scaled, dim=-1)


def sample(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
           generators: list[RowGenerator | None], num_top: int = 0) -> SampledTokens:
    """Sample one token per row of ``logits`` (``[batch, vocab]``), all rows at once.

    One batched filter (``processed_logprobs``) and one batched draw (``draw``): each row draws
    from its own generator (``RowGenerator``) so a seeded request gives the same tokens whatever
    else shares the batch. Greedy rows (temperature 0) take the argmax and draw nothing.
    """
    logits = logits.float()
    if any(t > 0 and (k > 0 or p < 1) for t, k, p in zip(temperature, top_k, top_p, strict=True)):
        logp = processed_logprobs(
            logits, torch.tensor(temperature, dtype=torch.float32, device=logits.device),
            torch.tensor(top_k, device=logits.device),
            torch.tensor(top_p, dtype=torch.float32, device=logits.device),
        )
    else:  # no row filters: processed_logprobs's ops that do something, the same bits
        logp = _unfiltered_logprobs(logits, temperature)
    drawn = [row for row, t in enumerate(temperature) if t > 0]
    if len(drawn) == len(temperature):
        ids = draw(logp.exp(), generators)  # [batch]
    else:
        ids = torch.argmax(logp, dim=-1)
        if drawn:
            rows = torch.tensor(drawn, device=logits.device)
            ids[rows] = draw(logp[rows].exp(), [generators[r] for r in drawn])
    lps = logp.gather(1, ids[:, None]).squeeze(1).tolist()
    out = SampledTokens(token_ids=ids.tolist(), logprobs=lps)
    if num_top > 0:
        k = min(num_top, logp.shape[-1])
        top_vals, top_idx = torch.topk(logp, k, dim=-1)
        out.top_ids, out.top_logprobs = top_idx.tolist(), top_vals.tolist()
    return out
