"""``areal-agents train-rm``: pairs in, a loadable reward model and its eval metrics out."""

from __future__ import annotations

import json

import pytest

from areal_agents.cli import main
from areal_agents.rewards.reward_model import PreferencePair, RewardModel, write_pairs


def _pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    return [PreferencePair(f"{i % 10} + 1 = ?", f"Answer: {i % 10 + 1}", f"no idea {i}")
            for i in range(offset, offset + n)]


def test_train_rm_end_to_end(tmp_path, capsys) -> None:
    train = write_pairs(_pairs(32), tmp_path / "train.jsonl")
    held_out = write_pairs(_pairs(8, offset=100), tmp_path / "eval.jsonl")
    out = tmp_path / "rm"
    code = main(["train-rm", "--pairs", str(train), "--eval-pairs", str(held_out),
                 "--model", "tiny:xs", "--out", str(out), "--steps", "8", "--lr", "3e-3",
                 "--batch-size", "8", "--eval-every", "4"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.split("\nreward model:")[0])
    assert summary["pairs"] == 32 and summary["eval_pairs"] == 8 and summary["steps"] == 8
    assert summary["eval_accuracy"] > summary["eval_accuracy_start"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert rows[-1]["rm/eval_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-4)
    rm = RewardModel.load(out)
    chosen, rejected = rm.score(["3 + 1 = ?"] * 2, ["Answer: 4", "no idea 3"])
    assert chosen > rejected


def test_train_rm_bad_row_is_an_error_naming_file_and_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    code = main(["train-rm", "--pairs", str(bad), "--out", str(tmp_path / "rm")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: missing ['chosen', 'rejected']")
    assert not (tmp_path / "rm").exists()
