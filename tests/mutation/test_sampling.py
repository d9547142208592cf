"""The sampling rule of ``engines/sampling.py`` on hand-computed examples: greedy rows,
top-k, top-p within the top-k set, ties at the cut-off, mixed rows, seeded draws, top ids."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.engines.sampling import (
    effective_temperature,
    keep_threshold,
    processed_logprobs,
    sample,
)

NEG_INF = float("-inf")
PROBS = [0.5, 0.3, 0.15, 0.05]  # one row whose probabilities are easy to add up


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in row] for row in rows], dtype=torch.float32)


def threshold(scaled, temperature, top_k, top_p) -> list[float]:
    return keep_threshold(scaled, torch.tensor(temperature, dtype=torch.float32),
                          torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float32)).tolist()


def test_effective_temperature_replaces_only_greedy_rows():
    out = effective_temperature(torch.tensor([0.0, 0.5, 2.0]))
    assert out.tolist() == [1.0, 0.5, 2.0]


def test_nothing_filtered_without_top_k_or_top_p():
    assert threshold(logits_of(PROBS, PROBS), [1.0, 0.0], [0, 0], [1.0, 1.0]) == [NEG_INF] * 2


def test_greedy_rows_are_never_filtered():
    assert threshold(logits_of(PROBS, PROBS), [0.0, 0.0], [1, 0], [1.0, 0.5]) == [NEG_INF] * 2


@pytest.mark.parametrize(("top_k", "kept"), [(1, 1), (2, 2), (3, 3), (4, 4), (9, 4)])
def test_top_k_threshold_is_the_kth_largest(top_k, kept):
    (t,) = threshold(logits_of(PROBS), [1.0], [top_k], [1.0])
    assert t == pytest.approx(math.log(PROBS[kept - 1]))


@pytest.mark.parametrize(("top_p", "kept"), [(1e-9, 1), (0.45, 1), (0.55, 2), (0.7, 2),
                                             (0.85, 3), (0.99, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p, kept):
    (t,) = threshold(logits_of(PROBS), [1.0], [0], [top_p])
    assert t == pytest.approx(math.log(PROBS[kept - 1]))


def test_top_p_is_taken_within_the_top_k_set():
    # top-2 renormalised: 0.625, 0.375; top_p 0.6 keeps only the first (0.5 + 0.3 overall
    # would need two)
    (t,) = threshold(logits_of(PROBS), [1.0], [2], [0.6])
    assert t == pytest.approx(math.log(0.5))
    (t,) = threshold(logits_of(PROBS), [1.0], [3], [0.9])  # 0.526, 0.316: two reach 0.84 < 0.9
    assert t == pytest.approx(math.log(0.15))


def test_mixed_rows_in_one_batch():
    scaled = logits_of(PROBS, PROBS, PROBS, PROBS)
    out = threshold(scaled, [1.0, 1.0, 1.0, 0.0], [2, 0, 0, 2], [1.0, 0.7, 1.0, 0.7])
    assert out[0] == pytest.approx(math.log(0.3))
    assert out[1] == pytest.approx(math.log(0.3))
    assert out[2:] == [NEG_INF, NEG_INF]


def test_processed_logprobs_values():
    logits = logits_of(PROBS, PROBS, PROBS)
    out = processed_logprobs(logits, torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0, 0, 2]),
                             torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(out[0].exp(), torch.tensor(PROBS))
    tempered = torch.tensor(PROBS).sqrt()
    torch.testing.assert_close(out[1].exp(), tempered / tempered.sum())
    torch.testing.assert_close(out[2, :2].exp(), torch.tensor([0.625, 0.375]))
    assert out[2, 2:].tolist() == [NEG_INF, NEG_INF]


def test_ties_at_the_cut_off_are_kept():
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    out = processed_logprobs(logits, torch.tensor([1.0]), torch.tensor([1]), torch.tensor([1.0]))
    torch.testing.assert_close(out[0, :2].exp(), torch.tensor([0.5, 0.5]))
    assert out[0, 2].item() == NEG_INF


def test_greedy_sample_takes_the_argmax_with_temperature_1_logprobs():
    logits = logits_of([0.1, 0.6, 0.3])
    out = sample(logits * 3, [0.0], [1], [0.5], [None])
    assert out.token_ids == [1]
    expected = torch.log_softmax(logits[0] * 3, dim=-1)[1].item()
    assert out.logprobs == [pytest.approx(expected)]
    assert out.top_ids is None and out.top_logprobs is None


def test_sampling_respects_the_filter_and_reports_processed_logprobs():
    logits = logits_of(PROBS, PROBS)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    seen: set[int] = set()
    for _ in range(40):
        out = sample(logits, [1.0, 1.0], [2, 1], [1.0, 1.0], gens)
        seen.add(out.token_ids[0])
        assert out.token_ids[1] == 0  # top-1 at temperature 1: always the argmax
        assert out.logprobs[1] == pytest.approx(0.0, abs=1e-6)
        p = 0.625 if out.token_ids[0] == 0 else 0.375
        assert out.logprobs[0] == pytest.approx(math.log(p), rel=1e-5)
    assert seen == {0, 1}  # both top-2 tokens drawn, nothing else


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def draws(rows: list[int]) -> list[int]:
        gen = torch.Generator().manual_seed(7)
        others = [torch.Generator().manual_seed(100 + i) for i in range(len(rows))]
        out = []
        for _ in range(5):
            result = sample(logits[rows], [1.0] * len(rows), [0] * len(rows),
                            [1.0] * len(rows), [gen, *others[1:]])
            out.append(result.token_ids[0])
        return out

    assert draws([0]) == draws([0, 1, 2])


def test_top_logprobs():
    logits = logits_of(PROBS)
    out = sample(logits, [0.0], [0], [1.0], [None], num_top=2)
    assert out.top_ids == [[0, 1]]
    assert out.top_logprobs[0] == pytest.approx([math.log(0.5), math.log(0.3)], rel=1e-5)
    out = sample(logits, [0.0], [0], [1.0], [None], num_top=9)  # more than the vocabulary
    assert out.top_ids == [[0, 1, 2, 3]]


def test_unsorted_rows_are_sorted_before_the_cut_off():
    shuffled = [PROBS[i] for i in (2, 0, 3, 1)]  # 0.15, 0.5, 0.05, 0.3
    scaled = logits_of(shuffled, list(reversed(shuffled)))
    out = threshold(scaled, [1.0, 1.0], [2, 0], [1.0, 0.7])
    assert out == pytest.approx([math.log(0.3), math.log(0.3)])
    out = threshold(scaled, [1.0, 1.0], [0, 3], [0.99, 1.0])
    assert out == pytest.approx([math.log(0.05), math.log(0.15)])


def test_a_token_whose_preceding_mass_equals_top_p_is_not_kept():
    scaled = logits_of([0.6, 0.3, 0.1])
    probs = torch.softmax(scaled, dim=-1)
    top_p = (torch.cumsum(probs, dim=-1) - probs)[0, 1].item()  # the first token's mass
    (t,) = threshold(scaled, [1.0], [0], [top_p])
    assert t == pytest.approx(scaled[0, 0].item())


def test_threshold_has_the_logits_dtype():
    scaled = logits_of(PROBS).double()
    out = keep_threshold(scaled, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]))
    assert out.dtype == torch.float64
    out = keep_threshold(scaled, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0]))
    assert out.dtype == torch.float64 and out.item() == pytest.approx(math.log(0.3))


def test_greedy_rows_never_draw():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 0.1, 0.0, 0.05]])  # nearly flat: a draw would rarely be 1
    picks = {sample(logits, [0.0], [0], [1.0], [None]).token_ids[0] for _ in range(30)}
    assert picks == {1}


def test_one_top_logprob():
    out = sample(logits_of(PROBS), [0.0], [0], [1.0], [None], num_top=1)
    assert out.top_ids == [[0]]
    assert out.top_logprobs[0] == pytest.approx([math.log(0.5)], rel=1e-5)


@pytest.fixture
def float64_default():
    """torch's default float dtype set to float64 for one test (a user's global setting)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_sample_computes_in_float32_whatever_the_default_dtype(float64_default):
    """The engine's log-probs must equal the float32 computation the trainers repeat, bit for
    bit, even when torch's default dtype is float64 (temperature and top_p tensors are built
    from Python floats)."""
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.0, 0.1, -0.4, 0.9]], dtype=torch.float32)
    out = sample(logits, [0.7, 1.3], [0, 3], [0.9, 1.0], [torch.Generator().manual_seed(0)] * 2)
    reference = processed_logprobs(logits, torch.tensor([0.7, 1.3], dtype=torch.float32),
                                   torch.tensor([0, 3]),
                                   torch.tensor([0.9, 1.0], dtype=torch.float32))
    expected = reference.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1).tolist()
    assert out.logprobs == expected  # exact: a float64 temperature would change the low bits


def test_top_p_is_compared_in_float32_whatever_the_default_dtype(float64_default):
    """A top_p a quarter ulp above the second token's float32 preceding mass rounds to that
    mass in float32, so the mass does not lie below it and only the first token is kept.
    (Compared in float64 it would keep two.)"""
    logits = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float32)
    probs = torch.softmax(logits, dim=-1)
    mass = (torch.cumsum(probs, dim=-1) - probs)[0, 1]  # float32: the second token's preceding
    top_p = mass.item() + (torch.nextafter(mass, torch.tensor(1.0, dtype=torch.float32))
                           - mass).item() / 4
    assert torch.tensor(top_p, dtype=torch.float32) == mass
    out = sample(logits, [1.0], [0], [top_p], [torch.Generator().manual_seed(0)], num_top=2)
    assert out.token_ids == [0] and out.logprobs == [0.0]
    assert out.top_logprobs == [[0.0, NEG_INF]]
