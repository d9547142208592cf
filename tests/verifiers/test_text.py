"""The exact and regex verifiers: normalisation options, accepted lists, reasons."""

from __future__ import annotations

import pytest

from areal_agents.verifiers import Verdict
from areal_agents.verifiers.exact import ExactVerifier, normalize
from areal_agents.verifiers.regex import RegexVerifier


@pytest.mark.parametrize(
    ("kwargs", "response", "answer", "score"),
    [
        ({}, "  Paris. ", "paris", 1.0),
        ({}, "New   York", "new york", 1.0),
        ({"case_sensitive": True}, "paris", "Paris", 0.0),
        ({"case_sensitive": True}, "Paris", "Paris", 1.0),
        ({"whitespace": "keep"}, "new  york", "new york", 0.0),
        ({"whitespace": "strip"}, "  new york  ", "new york", 1.0),
        ({"whitespace": "strip"}, "new  york", "new york", 0.0),
        ({"trailing": ""}, "Paris.", "Paris", 0.0),
        ({}, "Lyon", ["Paris", "Lyon"], 1.0),
        ({}, "12", 12, 1.0),
        ({"answer_prefix": "Answer:"}, "Let me think. 3 or 4... Answer: 4", "4", 1.0),
        ({"answer_prefix": "Answer:"}, "Answer: 3. No wait, Answer: 4", "4", 1.0),
    ],
)
def test_exact_options(kwargs, response, answer, score):
    assert ExactVerifier(**kwargs).verify(response, answer).score == score


def test_exact_reasons():
    v = ExactVerifier(answer_prefix="Answer:")
    assert v.verify("Answer: Paris.", "paris") == Verdict(
        1.0, "expected 'paris', got 'Paris.': equal"
    )
    assert v.verify("Answer: Lyon", "paris") == Verdict(0.0, "got 'Lyon': not the expected answer")
    assert v.verify("Paris", "paris") == Verdict(0.0, "no 'Answer:' in the response")
    assert v.verify("Answer:  ", "paris") == Verdict(
        0.0, "the answer part of the response is empty"
    )
    assert v.verify("", "paris") == Verdict(0.0, "empty response")
    assert ExactVerifier().verify(None, "paris") == Verdict(0.0, "empty response")


def test_exact_bad_options():
    with pytest.raises(ValueError, match="whitespace must be 'collapse', 'strip' or 'keep'"):
        ExactVerifier(whitespace="squash")
    with pytest.raises(ValueError, match="answer_prefix must be a non-empty marker"):
        ExactVerifier(answer_prefix="")


def test_normalize():
    assert normalize("  The   Eiffel Tower. ") == "the eiffel tower"
    assert normalize("A.", trailing="") == "a."
    assert normalize(" A ", whitespace="keep", case_sensitive=True) == " A "


@pytest.mark.parametrize(
    ("pattern", "kwargs", "response", "answer", "verdict"),
    [
        (r"Answer: (\w+)", {}, "Answer: B", "b", Verdict(1.0, "expected 'b', got 'B': equal")),
        (
            r"Answer: (\w+)",
            {},
            "Answer: A ... Answer: C",
            "c",
            Verdict(1.0, "expected 'c', got 'C': equal"),
        ),
        (r"Answer: (\w+)", {}, "Answer: A", "c", Verdict(0.0, "got 'A': not the expected answer")),
        (
            r"Answer: (\w+)",
            {},
            "I pick B",
            "b",
            Verdict(0.0, r"pattern 'Answer: (\\w+)' not found in the response"),
        ),
        (
            r"Answer: (\w+)",
            {"case_sensitive": True},
            "answer: B",
            "B",
            Verdict(0.0, r"pattern 'Answer: (\\w+)' not found in the response"),
        ),
        (
            r"(?P<pre>x)=(?P<answer>\d+)",
            {},
            "x=5",
            "5",
            Verdict(1.0, "expected '5', got '5': equal"),
        ),
        (r"(\d+) (\d+)", {"group": 2}, "3 4", "4", Verdict(1.0, "expected '4', got '4': equal")),
        (r"\d+", {}, "it is 42", "42", Verdict(1.0, "expected '42', got '42': equal")),
        (r"(\d+)", {}, "", "42", Verdict(0.0, "empty response")),
    ],
)
def test_regex(pattern, kwargs, response, answer, verdict):
    assert RegexVerifier(pattern, **kwargs).verify(response, answer) == verdict


def test_regex_bad_patterns():
    with pytest.raises(ValueError, match=r"pattern '\(' does not compile"):
        RegexVerifier("(")
    with pytest.raises(ValueError, match=r"has 1 group\(s\), no group 2"):
        RegexVerifier(r"(\d)", group=2)
    with pytest.raises(ValueError, match="has no group named 'value'"):
        RegexVerifier(r"(\d)", group="value")
