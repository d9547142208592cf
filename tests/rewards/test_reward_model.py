"""Bradley-Terry reward model: loss value, pooling under padding, training, pairs, reward fn."""

from __future__ import annotations

import asyncio
import math
import re

import numpy as np
import pytest
import torch

from areal_agents.envs import arithmetic
from areal_agents.episode import Episode
from areal_agents.rewards.reward_model import (
    PreferencePair,
    RewardModel,
    RewardModelReward,
    bradley_terry_loss,
    evaluate_pairs,
    pairs_from_episodes,
    read_pairs,
    train_reward_model,
    write_pairs,
)


@pytest.fixture(scope="module")
def rm() -> RewardModel:
    return RewardModel.from_pretrained("tiny:xs", seed=0)


def arithmetic_pairs(seeds: range) -> list[PreferencePair]:
    """Correct ``Answer: n`` replies preferred to wrong replies out of format."""
    pairs = []
    for s in seeds:
        question, answer = arithmetic.make_task(np.random.default_rng(s), 1, "+-")
        pairs.append(PreferencePair(f"{question} = ?", f"Answer: {answer}",
                                    f"no idea, {answer + 3}"))
    return pairs


def test_bradley_terry_loss_by_hand() -> None:
    # -log sigmoid(2 - 0) = log(1 + e^-2) = 0.126928; -log sigmoid(-1 - 0) = log(1 + e) = 1.313262
    loss = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.e)) / 2)
    assert loss.item() == pytest.approx(0.720095, abs=1e-6)


def test_last_token_pooling_is_the_same_alone_right_and_left_padded(rm: RewardModel) -> None:
    short, long = rm.encode("1 + 1 = ?", "Answer: 2"), rm.encode("12 * 13 = ?", "Answer: 156 ok")
    assert len(short) < len(long)
    alone = rm.score_ids([short]) + rm.score_ids([long])
    with torch.no_grad():
        right = rm.forward(*rm.pad([short, long], "right")).tolist()
        left = rm.forward(*rm.pad([short, long], "left")).tolist()
    assert right == pytest.approx(alone, abs=1e-5) and left == pytest.approx(alone, abs=1e-5)
    # HF's own right-padded pooling agrees; its left-padded forward would shift the positions
    ids, mask = rm.pad([short, long], "right")
    with torch.no_grad():
        hf = rm.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
    assert hf == pytest.approx(alone, abs=1e-5)


def test_pad_places_tokens_and_mask(rm: RewardModel) -> None:
    ids, mask = rm.pad([[5, 6, 7], [8]], "left")
    pad = rm.pad_token_id
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_training_raises_held_out_accuracy() -> None:
    eval_pairs = arithmetic_pairs(range(1_000_000, 1_000_016))
    rm = train_reward_model(arithmetic_pairs(range(64)), model="tiny:xs", steps=12, lr=3e-3,
                            batch_size=8, eval_pairs=eval_pairs, eval_every=6)
    assert [row["step"] for row in rm.history] == [0, 6, 12]
    start, end = rm.history[0]["rm/eval_accuracy"], rm.history[-1]["rm/eval_accuracy"]
    assert end > start and end >= 0.9, rm.history
    assert rm.history[-1]["rm/eval_loss"] < rm.history[0]["rm/eval_loss"]
    assert evaluate_pairs(rm, eval_pairs)["accuracy"] == end


def test_save_load_round_trip(rm: RewardModel, tmp_path) -> None:
    rm.save(tmp_path / "rm")
    again = RewardModel.load(tmp_path / "rm")
    args = (["3 + 4 = ?", "9 - 2 = ?"], ["Answer: 7", "Answer: 5"])
    assert again.score(*args) == pytest.approx(rm.score(*args), abs=1e-6)
    with pytest.raises(FileNotFoundError, match=r"reward_model\.json is missing"):
        RewardModel.load(tmp_path)


def test_read_pairs_accepts_text_and_messages(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"prompt": "1 + 1 = ?", "chosen": "Answer: 2", "rejected": "Answer: 3"}\n\n'
        '{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],'
        ' "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}\n')
    pairs = read_pairs(path)
    assert pairs[0] == PreferencePair("1 + 1 = ?", "Answer: 2", "Answer: 3")
    assert pairs[1].prompt == [] and pairs[1].chosen[1]["content"] == "hello"
    assert read_pairs(write_pairs(pairs, tmp_path / "again.jsonl")) == pairs


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "q", "chosen": "a"}', "missing ['rejected']"),
    ("[1, 2]", "a row must be a JSON object, got list"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}', "'chosen' must be a string or a list"),
    ('{"prompt": "q", "chosen": "a",', "not valid JSON"),
])
def test_bad_row_names_file_and_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: ") as info:
        read_pairs(path)
    assert message in str(info.value)


def _episode(seed: int, reply: str, reward: float) -> Episode:
    messages = [{"role": "user", "content": f"task {seed}"},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Correct." if reward else "Wrong."}]
    return Episode(agents=["agent"], messages={"agent": messages}, rewards={"agent": [reward]},
                   returns={"agent": reward}, length=1, status="terminated", seed=seed)


def test_pairs_from_episodes_per_seed() -> None:
    episodes = [_episode(1, "Answer: 2", 1.0), _episode(1, "Answer: 5", 0.0),
                _episode(1, "Answer: 6", 0.0), _episode(1, "Answer: 2", 1.0),
                _episode(2, "Answer: 9", 0.0), _episode(3, "Answer: 4", 1.0)]
    pairs = pairs_from_episodes(episodes)
    prompt = [{"role": "user", "content": "task 1"}]  # the env's feedback is left out
    assert sorted(pairs, key=lambda p: p.rejected) == [
        PreferencePair(prompt, "Answer: 2", "Answer: 5"),
        PreferencePair(prompt, "Answer: 2", "Answer: 6")]
    assert len(pairs_from_episodes(episodes, max_pairs_per_group=1)) == 1
    judged = pairs_from_episodes(episodes, score=lambda ep: -ep.returns["agent"])
    assert {(p.chosen, p.rejected) for p in judged} == {("Answer: 5", "Answer: 2"),
                                                        ("Answer: 6", "Answer: 2")}
    assert pairs_from_episodes(episodes, min_margin=1.0) == []


def test_reward_fn_scores_the_last_reply_batched(rm: RewardModel) -> None:
    episodes = [_episode(s, f"Answer: {s}", 1.0) for s in range(5)]
    expected = rm.score([[{"role": "user", "content": f"task {s}"}] for s in range(5)],
                        [f"Answer: {s}" for s in range(5)])
    reward = RewardModelReward(rm, batch_size=4)
    calls = []
    score_ids = rm.score_ids

    def spy(seqs, batch_size=32):
        calls.append(len(seqs))
        return score_ids(seqs, batch_size)

    rm.score_ids = spy  # type: ignore[method-assign]
    try:
        async def run():
            return await asyncio.gather(*(reward(ep) for ep in episodes))

        got = asyncio.run(run())
    finally:
        del rm.score_ids
    assert [g["agent"] for g in got] == pytest.approx(expected, abs=1e-5)
    assert calls == [4, 1] and reward.num_scored == 5  # concurrent episodes share a forward
    sync = RewardModelReward(rm, normalize="sigmoid", clip=0.52)
    probs = [min(0.52, 1 / (1 + math.exp(-r))) for r in expected]
    assert [g["agent"] for g in sync.score_episodes(episodes)] == pytest.approx(probs, abs=1e-5)


def test_reward_fn_running_normalisation_and_unscored(rm: RewardModel) -> None:
    reward = RewardModelReward(rm, normalize="running")
    got = [g["agent"] for g in reward.score_episodes([_episode(s, f"A{s}", 1.0) for s in range(4)])]
    assert sum(got) == pytest.approx(0.0, abs=1e-4) and np.std(got) == pytest.approx(1.0, 1e-3)
    silent = Episode(agents=["agent"], messages={"agent": [{"role": "user", "content": "q"}]},
                     rewards={}, returns={"agent": 0.0}, length=0, status="terminated")
    assert reward.score_episodes([silent]) == [{}] and reward.num_unscored == 1
    metrics = reward.take_metrics()
    assert metrics["reward_model/scored"] == 4.0 and metrics["reward_model/unscored"] == 1.0
    assert reward.take_metrics() == {"reward_model/scored": 0.0, "reward_model/unscored": 0.0}
    from areal_agents.rewards.hooks import ModelReward

    assert isinstance(reward, ModelReward) and reward.policy is None  # per-step metrics logged
    with pytest.raises(ValueError, match="normalize='zscore'"):
        RewardModelReward(rm, normalize="zscore")  # type: ignore[arg-type]
