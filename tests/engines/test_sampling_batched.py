"""The batched sampler (``engines/sampling.py: sample``/``draw``) against the per-row
``torch.multinomial`` loop it replaced: same log-probs, same distribution of ids (chi-square
tests at fixed seeds), per-row seeds, never a filtered token, a clear error on NaN logits."""

from __future__ import annotations

import math
import random

import pytest
import torch

from areal_agents.engines.sampling import draw, processed_logprobs, row_uniforms, sample
from areal_agents.errors import EngineError

# one config per row group: temperature, top_k, top_p (mixes every filter; the last is greedy)
CONFIGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 4, 0.9),
           (0.0, 2, 0.5)]
VOCAB = 6
DRAWS = 1000  # rows per config in one batch


def per_row_sample(logits, temperature, top_k, top_p, generators):
    """The previous implementation: one ``torch.multinomial`` per sampled row."""
    logp = processed_logprobs(logits, torch.tensor(temperature, dtype=torch.float32),
                              torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float32))
    probs = logp.exp()
    chosen = torch.argmax(logp, dim=-1).tolist()
    for row, t in enumerate(temperature):
        if t > 0:
            chosen[row] = int(torch.multinomial(probs[row], 1, generator=generators[row]).item())
    return chosen, logp.gather(1, torch.tensor(chosen)[:, None]).squeeze(1).tolist()


def batch(seed: int, draws: int = DRAWS):
    """``draws`` rows of each config over one fixed logit row, each with its own generator
    (``random.Random``, as ``LocalEngine`` gives its rows)."""
    base = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    logits = base.repeat(len(CONFIGS) * draws, 1)
    temperature, top_k, top_p = (list(x) for x in zip(*[c for c in CONFIGS
                                                        for _ in range(draws)], strict=True))
    generators = [random.Random(seed * 10**6 + i) for i in range(len(logits))]
    return logits, temperature, top_k, top_p, generators


def torch_generators(seed: int, num: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 10**6 + i) for i in range(num)]


def counts(ids: list[int], config: int) -> list[int]:
    group = ids[config * DRAWS:(config + 1) * DRAWS]
    return [group.count(v) for v in range(VOCAB)]


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square quantile at about 1 - 1e-3 (Wilson-Hilferty; z is the normal quantile)."""
    h = 2 / (9 * dof)
    return dof * (1 - h + z * math.sqrt(h)) ** 3


def test_log_probs_equal_the_per_row_path_exactly():
    logits, temperature, top_k, top_p, generators = batch(seed=1, draws=200)
    new = sample(logits, temperature, top_k, top_p, generators)
    old_ids, old_lps = per_row_sample(logits, temperature, top_k, top_p,
                                      torch_generators(seed=1, num=len(logits)))
    old = {(row // 200, tok): lp for row, (tok, lp) in enumerate(zip(old_ids, old_lps,
                                                                       strict=True))}
    compared = 0
    for row, (tok, lp) in enumerate(zip(new.token_ids, new.logprobs, strict=True)):
        if (row // 200, tok) in old:  # a (config, id) both paths drew: bit-for-bit equal
            assert lp == old[(row // 200, tok)]
            compared += 1
    assert compared > 0.95 * len(new.token_ids)
    reference = processed_logprobs(logits, torch.tensor(temperature), torch.tensor(top_k),
                                   torch.tensor(top_p))
    ids = torch.tensor(new.token_ids)[:, None]
    assert new.logprobs == reference.gather(1, ids).squeeze(1).tolist()


def test_ids_have_the_per_row_paths_distribution():
    logits, temperature, top_k, top_p, generators = batch(seed=2)
    new = sample(logits, temperature, top_k, top_p, generators).token_ids
    old, _ = per_row_sample(logits, temperature, top_k, top_p,
                            torch_generators(seed=3, num=len(logits)))
    probs = processed_logprobs(logits[:1].repeat(len(CONFIGS), 1),
                               torch.tensor([c[0] for c in CONFIGS]),
                               torch.tensor([c[1] for c in CONFIGS]),
                               torch.tensor([c[2] for c in CONFIGS])).exp()
    for config, (temp, _, _) in enumerate(CONFIGS):
        n_new, n_old = counts(new, config), counts(old, config)
        kept = [v for v in range(VOCAB) if probs[config, v] > 0]
        assert all(n_new[v] == 0 for v in range(VOCAB) if v not in kept)  # never filtered
        if temp == 0:  # greedy: the argmax every time, on both paths
            assert n_new == n_old and max(n_new) == DRAWS
            continue
        # goodness of fit to the exact probabilities (those the old path sampled from)
        fit = sum((n_new[v] - DRAWS * probs[config, v].item()) ** 2
                  / (DRAWS * probs[config, v].item()) for v in kept)
        assert fit < chi2_critical(len(kept) - 1), (config, n_new, probs[config].tolist())
        # homogeneity of the two paths' counts (two-sample chi-square)
        both = [v for v in kept if n_new[v] + n_old[v] > 0]
        homog = sum((n_new[v] - n_old[v]) ** 2 / (n_new[v] + n_old[v]) for v in both)
        assert homog < chi2_critical(len(both) - 1), (config, n_new, n_old)


def test_a_wrong_distribution_fails_the_same_test():
    """The test above has power: temperature-1 probabilities instead of 0.7's are rejected."""
    logits, temperature, top_k, top_p, generators = batch(seed=2)
    ids = sample(logits, temperature, top_k, top_p, generators).token_ids
    wrong = processed_logprobs(logits[:1], torch.tensor([1.0]), torch.tensor([0]),
                               torch.tensor([1.0])).exp()[0]
    n = counts(ids, 1)  # the temperature 0.7 rows
    fit = sum((n[v] - DRAWS * wrong[v].item()) ** 2 / (DRAWS * wrong[v].item())
              for v in range(VOCAB))
    assert fit > chi2_critical(VOCAB - 1)


def test_no_per_row_multinomial(monkeypatch):
    """One batched draw: the per-row ``torch.multinomial`` loop is gone (fails on the old
    code, which called it once per sampled row)."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    logits, temperature, top_k, top_p, generators = batch(seed=4)
    out = sample(logits[:64], temperature[:64], top_k[:64], top_p[:64], generators[:64])
    assert len(out.token_ids) == 64


def test_each_seeded_row_takes_one_uniform_from_its_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    first = sample(logits, [1.0, 0.0, 1.0], [0] * 3, [1.0] * 3, gens).token_ids
    # the greedy row drew nothing; the sampled rows advanced by exactly one float64 uniform
    assert gens[1].get_state().equal(torch.Generator().manual_seed(6).get_state())
    for row, seed in ((0, 5), (2, 7)):
        replay = torch.Generator().manual_seed(seed)
        u = torch.rand((), generator=replay, dtype=torch.float64)
        assert gens[row].get_state().equal(replay.get_state())
        cdf = torch.cumsum(torch.softmax(logits[row], dim=-1).double(), dim=-1)
        assert first[row] == int((cdf <= u * cdf[-1]).sum())
    again = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    assert sample(logits, [1.0, 0.0, 1.0], [0] * 3, [1.0] * 3, again).token_ids == first


def test_python_random_rows_draw_at_their_own_next_uniform():
    """The engine's rows (``random.Random``): one ``.random()`` per token, the inverse CDF at it,
    the same ids whatever shares the batch."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [random.Random(s) for s in (5, 6, 7)]
    ids = sample(logits, [1.0, 0.0, 1.0], [0] * 3, [1.0] * 3, rows).token_ids
    assert rows[1].random() == random.Random(6).random()  # the greedy row drew nothing
    for row, seed in ((0, 5), (2, 7)):
        replay = random.Random(seed)
        u = replay.random()
        assert rows[row].random() == replay.random()  # exactly one uniform was taken
        cdf = torch.cumsum(torch.softmax(logits[row], dim=-1).double(), dim=-1)
        assert ids[row] == int((cdf <= u * cdf[-1]).sum())
    alone = sample(logits[2:], [1.0], [0], [1.0], [random.Random(7)]).token_ids
    assert alone == [ids[2]]


def test_row_uniforms_mix_generator_kinds():
    torch.manual_seed(3)
    out = row_uniforms([random.Random(1), None, torch.Generator().manual_seed(2), None],
                       torch.device("cpu"))
    torch.manual_seed(3)
    shared = torch.rand(2, dtype=torch.float64).tolist()
    own = torch.rand((), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert out.dtype == torch.float64
    assert out.tolist() == [random.Random(1).random(), shared[0], own.item(), shared[1]]


def test_rows_without_a_generator_use_torchs_global_one():
    logits = torch.zeros(2, 10)
    torch.manual_seed(11)
    first = sample(logits, [1.0, 1.0], [0, 0], [1.0, 1.0], [None, None]).token_ids
    torch.manual_seed(11)
    assert sample(logits, [1.0, 1.0], [0, 0], [1.0, 1.0], [None, None]).token_ids == first


@pytest.mark.parametrize(("uniform", "expected"), [(0.0, 1), (0.49, 1), (0.5, 3),
                                                   (1.0 - 2**-53, 3)])
def test_draw_never_returns_a_zero_probability_token(monkeypatch, uniform, expected):
    """At the ends of [0, 1) the inverted CDF lands on the first and last kept tokens, not on
    the filtered tokens around them."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    real_rand = torch.rand

    def fixed(*args, **kwargs):
        return torch.full_like(real_rand(*args, **kwargs), uniform)

    monkeypatch.setattr(torch, "rand", fixed)
    assert draw(probs, [torch.Generator()]).tolist() == [expected]


def test_non_finite_logits_raise_an_engine_error():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), float("nan")]])
    with pytest.raises(EngineError, match=r"cannot sample rows \[1\]: their probabilities are "
                                          r"NaN, inf or all zero"):
        sample(logits, [1.0, 1.0], [0, 0], [1.0, 1.0], [None, None])


@pytest.mark.parametrize("temperature", [[1.0, 1.0, 0.0], [0.7, 1.0, 0.0], [1.3, 0.5, 2.0]])
def test_unfiltered_rows_report_processed_logprobs_bit_for_bit(temperature):
    """Rows without top-k/top-p take a shorter path; its log-probs (every token's, through
    ``num_top``) are processed_logprobs's exactly, -inf and NaN logits included."""
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)) * 4
    logits[0, 3], logits[1, 5] = float("-inf"), float("nan")
    out = sample(logits, temperature, [0] * 3, [1.0] * 3, [random.Random(i) for i in range(3)],
                 num_top=12)
    reference = processed_logprobs(logits, torch.tensor(temperature), torch.tensor([0] * 3),
                                   torch.tensor([1.0] * 3))
    values, ids = torch.topk(reference, 12, dim=-1)
    assert out.top_logprobs == values.tolist() and out.top_ids == ids.tolist()
    assert out.logprobs == reference.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1).tolist()


def test_unfiltered_path_keeps_infinities_and_filters_nan_bit_for_bit():
    """The shorter path maps NaN logits to -inf (filtered) and keeps +inf and -inf as they are,
    as processed_logprobs's ``scaled >= threshold`` does: the same bits, NaN where both give
    NaN (a row with a +inf logit)."""
    from areal_agents.engines.sampling import _unfiltered_logprobs

    inf = float("inf")
    logits = torch.tensor([[0.5, -inf, float("nan"), 2.0], [inf, 1.0, 0.0, float("nan")],
                           [1.0, 2.0, 3.0, -inf]])
    for temperature in ([1.0, 1.0, 0.0], [0.7, 1.0, 2.5]):
        got = _unfiltered_logprobs(logits, temperature)
        reference = processed_logprobs(logits, torch.tensor(temperature), torch.tensor([0] * 3),
                                       torch.tensor([1.0] * 3))
        torch.testing.assert_close(got, reference, rtol=0, atol=0, equal_nan=True)
        assert got[0, 2] == -inf and got[0, 1] == -inf  # NaN and -inf logits are filtered
        assert torch.isnan(got[1]).any()  # +inf kept (not clamped to the largest float)
