"""The numeric verifier: number parsing (commas, fractions, exponents) and tolerances."""

from __future__ import annotations

from fractions import Fraction

import pytest

from areal_agents.verifiers import Verdict
from areal_agents.verifiers.numeric import NumericVerifier, parse_numbers, reference_number


@pytest.mark.parametrize(
    ("response", "answer", "verdict"),
    [
        ("So the total is 1,000.", "1000", Verdict(1.0, "expected 1000, got 1,000: equal")),
        ("1000", "1,000", Verdict(1.0, "expected 1000, got 1000: equal")),
        ("3/4", "0.75", Verdict(1.0, "expected 0.75, got 3/4: equal")),
        ("It is 0.75", "3/4", Verdict(1.0, "expected 0.75, got 0.75: equal")),
        ("-2.5e3", -2500, Verdict(1.0, "expected -2500, got -2.5e3: equal")),
        ("−4 degrees", -4, Verdict(1.0, "expected -4, got −4: equal")),  # Unicode minus
        ("7 - 5 = 2", 2, Verdict(1.0, "expected 2, got 2: equal")),  # not "-5"
        (r"\boxed{12}, not 13", 12, Verdict(1.0, "expected 12, got 12: equal")),
        ("0.1", 0.1, Verdict(1.0, "expected 0.1, got 0.1: equal")),
        (
            "0.333333333333",
            "1/3",
            Verdict(1.0, "expected 1/3, got 0.333333333333: equal within tolerance"),
        ),
        ("0.33", "1/3", Verdict(0.0, "got 0.33: not equal to the expected answer")),
        ("13", 12, Verdict(0.0, "got 13: not equal to the expected answer")),
        ("", 12, Verdict(0.0, "empty response: no number to compare")),
        ("   ", 12, Verdict(0.0, "empty response: no number to compare")),
        ("no idea", 12, Verdict(0.0, "no number found in the response 'no idea'")),
        ("1/0", 12, Verdict(0.0, "no number found in the response '1/0'")),  # x/0: no number
    ],
)
def test_numeric_verdicts(response, answer, verdict):
    assert NumericVerifier().verify(response, answer) == verdict


def test_tolerances_and_pick():
    assert NumericVerifier(rel_tol=0.01).verify("99.5", 100).score == 1.0
    assert NumericVerifier(rel_tol=0.001).verify("99.5", 100).score == 0.0
    assert NumericVerifier(abs_tol=0.5).verify("99.5", 100).score == 1.0
    assert NumericVerifier(pick="first").verify("12 apples, 3 left", 12).score == 1.0
    assert NumericVerifier().verify("12 apples, 3 left", 12).score == 0.0


def test_non_string_response_scores_zero():
    assert NumericVerifier().verify(None, 1) == Verdict(0.0, "empty response: no number to compare")


def test_parse_numbers():
    values = [v for _, v in parse_numbers("1,234.5 and .5 and 1,2,3 and 6 / 8 and 2E2")]
    assert values == [Fraction("1234.5"), Fraction(1, 2), 1, 2, 3, Fraction(3, 4), 200]


def test_unusable_reference_raises_value_error():
    with pytest.raises(ValueError, match=r"the reference answer 'twelve' is not one number"):
        NumericVerifier().verify("12", "twelve")
    with pytest.raises(ValueError, match="is a bool"):
        reference_number(True)


def test_bad_options():
    with pytest.raises(ValueError, match="tolerances must be >= 0"):
        NumericVerifier(abs_tol=-1)
    with pytest.raises(ValueError, match="pick must be 'last' or 'first'"):
        NumericVerifier(pick="middle")
