"""The ``code`` verifier: solutions run against unit tests in the sandbox, scored with reasons."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from areal_agents import verifiers
from areal_agents.verifiers.code import CodeVerifier, extract_code, split_tests

TESTS = ["assert add(2, 2) == 4", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"


@pytest.fixture(scope="module")
def verifier():
    return verifiers.get("code", timeout=20.0)


def test_extracts_the_last_python_block_else_any_block_else_the_text():
    text = "```\nfirst\n```\n```python\nsecond\n```\n```py\nthird\n```\n```\nlast\n```"
    assert extract_code(text) == "third\n"
    assert extract_code("x\n```\nplain\n```") == "plain\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_split_tests_forms_and_bad_answers():
    assert split_tests(TESTS) == {"kind": "items", "items": TESTS}
    assert split_tests("x = 1\nassert x == 1\nassert x > 0\n")["items"] == [
        "x = 1\nassert x == 1", "assert x > 0"]
    functions = split_tests("import math\ndef test_a():\n    pass\ndef helper(): pass\n")
    assert functions["names"] == ["test_a"]
    with pytest.raises(ValueError, match="contain no assert and no test_"):
        split_tests("x = 1")
    with pytest.raises(ValueError, match="do not parse: line 1"):
        split_tests("assert (")
    with pytest.raises(ValueError, match="empty list"):
        split_tests([])


def test_all_tests_pass(verifier):
    verdict = verifier.verify(GOOD, TESTS)
    assert (verdict.score, verdict.reason) == (1.0, "all 3 tests passed")


def test_partial_credit_names_the_first_failing_test(verifier):
    verdict = verifier.verify("def add(a, b):\n    return a - b", TESTS)
    assert verdict.score == pytest.approx(1 / 3)
    assert verdict.reason == "1 of 3 tests passed; test 1 failed: AssertionError"


def test_all_or_nothing_and_revealed_tests():
    strict = CodeVerifier(scoring="all", reveal_tests=True, timeout=20.0)
    verdict = strict.verify("def add(a, b):\n    return a - b", TESTS)
    assert verdict.score == 0.0
    assert verdict.reason == ("1 of 3 tests passed; test 1 (assert add(2, 2) == 4) failed: "
                              "AssertionError")


def test_pytest_style_functions(verifier):
    tests = "def test_small():\n    assert add(1, 1) == 2\ndef test_big():\n    assert add(1, 2) == 4, 'no'\n"
    verdict = verifier.verify(GOOD, tests)
    assert (verdict.score, verdict.reason) == (0.5, "1 of 2 tests passed; test_big failed: "
                                                    "AssertionError: no")


def test_syntax_error_and_raising_solution(verifier):
    assert verifier.verify("def add(a, b) return", TESTS).reason == (
        "syntax error in the solution: line 1: expected ':'")
    raised = verifier.verify("raise ValueError('boom')", TESTS)
    assert (raised.score, raised.reason) == (0.0, "the solution raised ValueError: boom")


def test_timeout_is_named_and_finished_tests_count():
    verifier = CodeVerifier(timeout=3.0)
    code = "def add(a, b):\n    while a < 0: pass\n    return a + b"
    verdict = verifier.verify(code, TESTS)
    assert verdict.score == pytest.approx(2 / 3)
    assert verdict.reason.startswith("2 of 3 tests passed; test 3 did not finish: timed out after")


def test_a_solution_that_exits_early_fails_the_remaining_tests(verifier):
    code = "import os\ndef add(a, b):\n    if a == 0:\n        os._exit(0)\n    return a + b"
    verdict = verifier.verify(code, TESTS)
    assert verdict.score == pytest.approx(1 / 3)
    assert verdict.reason == ("1 of 3 tests passed; test 2 did not run: the program stopped "
                              "before it (exit status 0)")


def test_printing_fake_results_does_not_score(verifier):
    forged = 'print(\'x ["test", 0, null]\')\nprint(\'["test", 1, null]\')'
    assert verifier.verify(forged, TESTS).score == 0.0


async def test_averify_and_pickling(verifier):
    verdict = await verifiers.averify(verifier, GOOD, TESTS)
    assert verdict.correct
    copy = pickle.loads(pickle.dumps(verifier))
    assert copy._sandbox is None and copy.timeout == 20.0
    verdicts = await asyncio.gather(*(copy.averify(GOOD, TESTS[:1]) for _ in range(3)))
    assert all(v.correct for v in verdicts)
    assert copy.sandbox is verifier.sandbox  # one shared sandbox per option set
