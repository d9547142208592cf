"""Property tests of the per-policy admission / pause / resume / update state machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from areal_agents.rollout import StalenessControl


def test_capacity_formula_matches_areal_rule():
    s = StalenessControl(batch_size=4, max_staleness=2, max_concurrent=100)
    assert s.capacity() == 12  # (2 + 0 + 1) * 4
    s.admit(5)
    assert s.capacity() == 7
    s.finish("accepted", 5)
    assert s.capacity() == 7  # accepted still counts until the version moves
    s.set_version(1)
    assert s.capacity() == 11
    s2 = StalenessControl(batch_size=4, max_staleness=100, max_concurrent=3)
    assert s2.capacity() == 3  # concurrency bound


def test_synchronous_when_max_staleness_zero():
    s = StalenessControl(batch_size=3, max_staleness=0)
    s.admit(3)
    assert s.capacity() == 0
    s.finish("accepted", 3)
    assert s.capacity() == 0  # must train first
    s.set_version(1)
    assert s.capacity() == 3


def test_admit_beyond_capacity_and_bad_args_raise():
    s = StalenessControl(batch_size=1)
    with pytest.raises(RuntimeError, match="exceeds capacity 1"):
        s.admit(2)
    with pytest.raises(RuntimeError, match="only 0 running"):
        s.finish("accepted")
    s.admit()
    with pytest.raises(ValueError, match="outcome must be"):
        s.finish("trained")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        StalenessControl(batch_size=0)
    with pytest.raises(ValueError, match="backwards"):
        StalenessControl(batch_size=1, version=3).set_version(2)


def test_release_frees_concurrency_but_keeps_the_staleness_slot():
    s = StalenessControl(batch_size=4, max_staleness=0, max_concurrent=2)
    s.admit(2)
    assert s.capacity() == 0  # concurrency bound
    s.release(1)
    assert (s.running, s.waiting) == (1, 1)
    assert s.capacity() == 1  # one engine slot free; staleness allows 4 - 2 = 2
    s.admit(1)
    s.release(2)
    assert s.capacity() == 1  # staleness: 4 - (0 accepted + 0 running + 3 waiting)
    s.finish("accepted", 2, released=True)
    s.finish("filtered", 1, released=True)
    assert (s.waiting, s.accepted, s.filtered) == (0, 2, 1)
    assert s.capacity() == 2  # the filtered one freed its staleness slot
    with pytest.raises(RuntimeError, match="only 0 waiting"):
        s.finish("accepted", 1, released=True)
    with pytest.raises(RuntimeError, match=r"release\(1\) but only 0 running"):
        s.release(1)
    s.running, s.waiting = 5, 7
    s.rebase(1)
    assert (s.running, s.waiting, s.accepted) == (0, 0, 4)


def test_failed_update_resumes_and_keeps_version():
    s = StalenessControl(batch_size=2)
    with pytest.raises(OSError, match="disk full"), s.updating(1):
        assert s.paused and s.capacity() == 0
        raise OSError("disk full")
    assert not s.paused and s.version == 0 and s.capacity() == 2
    with s.updating(1):
        pass
    assert s.version == 1 and not s.paused


@given(st.integers(1, 8), st.integers(0, 3), st.integers(0, 20), st.integers(0, 50))
def test_rebase_gives_capacity_of_a_fresh_update(batch, staleness, version, junk):
    s = StalenessControl(batch_size=batch, max_staleness=staleness, max_concurrent=1000)
    s.running, s.accepted = junk, junk * 3  # whatever the killed run had in flight
    s.paused = True
    s.load_state_dict({**s.state_dict(), "version": version})
    assert s.running == 0 and not s.paused
    assert s.capacity() == (staleness + 1) * batch


class AdmissionMachine(RuleBasedStateMachine):
    """Random interleavings of admit / finish / train / update / pause / resume."""

    def __init__(self) -> None:
        super().__init__()
        self.s = StalenessControl(batch_size=3, max_staleness=1, max_concurrent=7)
        self.buffer = 0  # accepted, not yet trained
        self.trained = 0

    @rule(n=st.integers(1, 3))
    def admit(self, n: int) -> None:
        if n <= self.s.capacity():
            self.s.admit(n)

    @precondition(lambda self: self.s.running > 0)
    @rule(outcome=st.sampled_from(["accepted", "filtered", "failed"]))
    def finish(self, outcome: str) -> None:
        self.s.finish(outcome)  # type: ignore[arg-type]
        self.buffer += outcome == "accepted"

    @precondition(lambda self: self.s.running > 0)
    @rule()
    def release(self) -> None:
        self.s.release()

    @precondition(lambda self: self.s.waiting > 0)
    @rule(outcome=st.sampled_from(["accepted", "filtered", "failed"]))
    def finish_released(self, outcome: str) -> None:
        self.s.finish(outcome, released=True)  # type: ignore[arg-type]
        self.buffer += outcome == "accepted"

    @precondition(lambda self: self.buffer >= 3)
    @rule(fail=st.booleans())
    def train_and_update(self, fail: bool) -> None:
        self.buffer -= 3
        self.trained += 3
        before = self.s.version
        try:
            with self.s.updating(before + 1):
                if fail:
                    raise RuntimeError("push failed")
        except RuntimeError:
            assert self.s.version == before
            with self.s.updating(before + 1):  # the retry
                pass
        assert self.s.version == before + 1

    @rule()
    def pause_twice(self) -> None:
        self.s.pause()
        self.s.pause()
        assert self.s.capacity() == 0

    @rule()
    def resume_twice(self) -> None:
        self.s.resume()
        self.s.resume()

    @invariant()
    def bounds_hold(self) -> None:
        s = self.s
        assert 0 <= s.running <= s.max_concurrent
        assert s.waiting >= 0
        assert s.submitted == s.running + s.waiting + s.accepted + s.filtered + s.failed
        # staleness bound: nothing admitted beyond what max_staleness versions can train
        assert s.accepted + s.running + s.waiting <= (
            (s.max_staleness + s.version + 1) * s.batch_size)

    @invariant()
    def no_deadlock(self) -> None:
        """When nothing runs or waits and the buffer cannot fill a batch, admission is possible."""
        s = self.s
        if not s.paused and s.running == s.waiting == 0 and self.buffer < s.batch_size:
            assert s.capacity() > 0


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_consumed_beyond_a_batch_is_credited_not_leaked():
    s = StalenessControl(batch_size=4, max_staleness=1, max_concurrent=100)
    s.admit(8)
    s.finish("accepted", 7)
    s.finish("failed", 1)
    s.consume(7)  # whole groups of 4 + 3 episodes: one more than the batch
    with s.updating(1):
        pass
    assert s.overshoot == 3 and s.consumed == 0
    assert s.capacity() == 8  # (1 + 1 + 1) * 4 + 3 - 7: as if exactly 4 per version
    s.consume(3)  # a short step (the batch could not fill)
    s.set_version(2)
    assert s.overshoot == 2 and s.capacity() == (1 + 2 + 1) * 4 + 2 - 7
    plain = StalenessControl(batch_size=4, max_staleness=1)
    plain.set_version(3)  # without consume: AReaL's rule unchanged
    assert plain.overshoot == 0 and plain.capacity() == (1 + 3 + 1) * 4
