"""The math verifier (math-verify): boxed answers, LaTeX, fractions, thousands, units."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("math_verify")

from areal_agents.verifiers import Verdict
from areal_agents.verifiers.math_answer import MathVerifier


@pytest.fixture(scope="module")
def math_verifier():
    return MathVerifier()


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        (r"so the answer is $\boxed{\frac{1}{2}}$", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        ("The answer is 1/2.", "0.5"),
        (r"The answer is \boxed{1,000}", "1000"),
        ("1000", "1,000"),
        ("3/4", "0.75"),
        (r"\boxed{5\text{ cm}}", "5"),
        ("I think 7 + 5 = 12", 12),
        (r"$\frac{3}{4}$", "3/4"),
    ],
)
def test_equal_answers_score_one(math_verifier, response, answer):
    verdict = math_verifier.verify(response, answer)
    assert verdict.score == 1.0 and verdict.reason.endswith(": equal"), verdict


@pytest.mark.parametrize(
    ("response", "answer", "verdict"),
    [
        ("13", "12", Verdict(0.0, "got 13: not equal to the expected answer")),
        (
            r"\boxed{\frac{1}{3}}",
            "0.5",
            Verdict(0.0, r"got \frac{1}{3}: not equal to the expected answer"),
        ),
        ("", "12", Verdict(0.0, "empty response")),
        ("no idea", "12", Verdict(0.0, "no math answer found in the response 'no idea'")),
        (None, "12", Verdict(0.0, "empty response")),
    ],
)
def test_wrong_or_missing_answers_score_zero(math_verifier, response, answer, verdict):
    assert math_verifier.verify(response, answer) == verdict


def test_reason_of_a_correct_answer(math_verifier):
    assert math_verifier.verify("It is 3/4", "0.75") == Verdict(
        1.0, "expected 0.75, got 3/4: equal"
    )


def test_wrong_reason_never_states_the_expected_answer(math_verifier):
    assert "17" not in math_verifier.verify("The answer is 4", "17").reason


def test_works_outside_the_main_thread(math_verifier):
    """SIGALRM timeouts only work in the main thread; elsewhere it runs without them."""
    out = []
    thread = threading.Thread(target=lambda: out.append(math_verifier.verify("0.5", "1/2")))
    thread.start()
    thread.join()
    assert out[0].score == 1.0


def test_unparseable_reference_raises_value_error(math_verifier):
    with pytest.raises(ValueError, match="is not a math expression math-verify can parse"):
        math_verifier.verify("12", "")


def test_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s must be >= 1"):
        MathVerifier(timeout_s=0)
