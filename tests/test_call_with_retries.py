"""``call_with_retries``: the bounded, logged retry both LLM paths use."""

from __future__ import annotations

import logging

import pytest

from areal_agents.agents import llm


class Flaky(Exception):
    pass


def _calls(outcomes: list):
    seen = []

    async def call():
        seen.append(len(seen))
        out = outcomes[len(seen) - 1]
        if isinstance(out, Exception):
            raise out
        return out

    return call, seen


async def test_retries_retryable_errors_with_growing_delays_and_logs_each(monkeypatch, caplog):
    slept = []

    async def sleep(delay):
        slept.append(delay)

    monkeypatch.setattr(llm.asyncio, "sleep", sleep)
    call, seen = _calls([Flaky("a"), Flaky("b"), "ok"])
    with caplog.at_level(logging.WARNING):
        got = await llm.call_with_retries(call, attempts=3, retryable=lambda e: isinstance(
            e, Flaky), logger=logging.getLogger("t"), what="the call")
    assert got == "ok" and len(seen) == 3 and slept == [0.1, 0.2]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Retrying the call in 0.1 s (attempt 2 of 3) as it raised Flaky: a",
                        "Retrying the call in 0.2 s (attempt 3 of 3) as it raised Flaky: b"]


async def test_the_last_and_non_retryable_errors_are_raised(monkeypatch):
    async def sleep(delay):
        pass

    monkeypatch.setattr(llm.asyncio, "sleep", sleep)
    call, seen = _calls([Flaky("a"), Flaky("b")])
    with pytest.raises(Flaky, match="b"):
        await llm.call_with_retries(call, attempts=2, retryable=lambda e: True,
                                    logger=logging.getLogger("t"), what="x")
    assert len(seen) == 2
    call, seen = _calls([ValueError("bad request"), "never"])
    with pytest.raises(ValueError, match="bad request"):
        await llm.call_with_retries(call, attempts=5, retryable=lambda e: isinstance(e, Flaky),
                                    logger=logging.getLogger("t"), what="x")
    assert len(seen) == 1
