"""``SampleLog.submit``: recorded samples are decoded and written by a background thread, in
step order, off the train step and the event loop; ``drain`` waits and raises write errors."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from areal_agents.samples import Sample
from areal_agents.trainers.sample_log import SampleLog


class GatedTokenizer:
    """Decodes id ``i`` to ``"w<i>"``; each ``batch_decode`` waits until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.threads: list[str] = []

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        assert self.gate.wait(10), "the test never opened the gate"
        self.threads.append(threading.current_thread().name)
        return ["".join(f"w{i}" for i in row) for row in ids]


class BrokenTokenizer:
    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        raise RuntimeError("decoder exploded")


def _samples(n: int = 2) -> list[Sample]:
    return [Sample([3, 4, 5], [0, 1, 1], [0.0, -0.5, -0.25], [-1, 7, 7], reward=float(i),
                   agent="a", policy="p", group=str(100 + i)) for i in range(n)]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_submit_returns_before_the_write_and_drain_waits_for_it(tmp_path):
    tokenizer, log = GatedTokenizer(), SampleLog(tmp_path, 2)
    advantages = torch.tensor([[0.0, 0.5, 0.5, 9.0], [0.0, -0.5, -0.5, 9.0]])  # [batch, seq]
    log.stage("p", _samples(), advantages, version=7, tokenizer=tokenizer)
    log.submit(1, ["p"])  # would block forever if it decoded in this thread
    path = tmp_path / "samples" / "step_1.jsonl"
    assert not path.exists()
    log.stage("p", _samples(1), None, version=8, tokenizer=tokenizer)  # the next step's
    tokenizer.gate.set()
    log.drain()
    rows = _rows(path)
    assert [r["task_seed"] for r in rows] == [100, 101]  # step 1's batch, not the new stage
    assert rows[0]["tokens"] == ["w3", "w4", "w5"] and rows[0]["policy_version"] == 7
    assert rows[0]["advantages"] == [0.0, 0.5, 0.5] and rows[1]["advantage"] == -0.5
    assert set(tokenizer.threads) and all(t.startswith("aa-sample-log") for t in tokenizer.threads)
    log.close()
    log.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("aa-sample-log")]


def test_steps_are_written_in_order_and_a_failed_write_raises_at_drain(tmp_path):
    log = SampleLog(tmp_path, 1)
    tokenizer = GatedTokenizer()
    tokenizer.gate.set()
    for step in (1, 2, 3):
        log.stage("p", _samples(), None, version=step, tokenizer=tokenizer)
        log.submit(step, ["p"])
    log.stage("p", _samples(), None, version=4, tokenizer=BrokenTokenizer())
    log.submit(4, ["p"])
    with pytest.raises(RuntimeError, match="decoder exploded"):
        log.drain()
    assert [_rows(tmp_path / "samples" / f"step_{s}.jsonl")[0]["policy_version"]
            for s in (1, 2, 3)] == [1, 2, 3]
    assert not (tmp_path / "samples" / "step_4.jsonl").exists()
    log.drain()  # the error was reported once
    log.close()


def test_submit_is_a_no_op_when_recording_is_off(tmp_path):
    log = SampleLog(tmp_path, 0)
    log.stage("p", _samples(), None, version=0, tokenizer=BrokenTokenizer())
    log.submit(1, ["p"])
    log.close()
    assert not (tmp_path / "samples").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("aa-sample-log")]
