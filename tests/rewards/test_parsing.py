"""Judge replies are read robustly; unreadable and off-scale replies raise, never score 0."""

from __future__ import annotations

import pytest

from areal_agents.rewards import (
    JudgeParseError,
    OutOfRange,
    parse_score,
    parse_scores,
    parse_verdict,
)


@pytest.mark.parametrize("reply, want", [
    ("Score: 7/10", 7.0), ("7", 7.0), ("**7**", 7.0), ('{"score": 7}', 7.0),
    ("Reasoning... the answer is fine.\nScore: 8", 8.0), ("I give it 6/10.", 6.0),
    ('```json\n{"reason": "ok", "score": 2.5}\n```', 2.5), ("rating = 3", 3.0),
    ("Score: **9**", 9.0), ("10.", 10.0),
])
def test_scores_in_every_usual_format(reply, want):
    assert parse_score(reply, 0, 10) == want


@pytest.mark.parametrize("reply", ["", None, "looks good to me", "Score: high"])
def test_unreadable_reply_raises_with_the_reply_quoted(reply):
    with pytest.raises(JudgeParseError, match="no score found in the judge's reply"):
        parse_score(reply, 0, 10)


def test_out_of_range_is_its_own_error():
    with pytest.raises(OutOfRange, match=r"judge score 11 is outside the scale \[0, 10\]"):
        parse_score("Score: 11", 0, 10)
    with pytest.raises(OutOfRange):
        parse_score('{"score": -1}', 0, 10)


@pytest.mark.parametrize("reply, want", [
    ("correct", "correct"), ("Verdict: incorrect", "incorrect"), ("It is wrong.", "incorrect"),
    ("Is it correct? No.", "incorrect"), ("yes", "correct"), ("INCORRECT", "incorrect"),
])
def test_verdicts(reply, want):
    assert parse_verdict(reply) == want


def test_no_verdict_raises():
    with pytest.raises(JudgeParseError, match="no verdict"):
        parse_verdict("the number is 7")


def test_group_scores_in_candidate_order_lines_or_json():
    assert parse_scores("2: 3\n1: 9\n3: 0", 3, 0, 10) == [9.0, 3.0, 0.0]
    assert parse_scores('{"scores": [1, 2]}', 2, 0, 10) == [1.0, 2.0]
    assert parse_scores("Candidate 1: 4\nCandidate 2: **5**", 2, 0, 10) == [4.0, 5.0]
    with pytest.raises(JudgeParseError, match=r"missing \[2\]"):
        parse_scores("1: 4", 2, 0, 10)
    with pytest.raises(OutOfRange, match="candidate 2"):
        parse_scores("1: 4\n2: 40", 2, 0, 10)
