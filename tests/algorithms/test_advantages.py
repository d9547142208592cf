"""Advantage estimators against hand values and straightforward float64 Python references."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from areal_agents.algorithms.advantages import (
    broadcast_advantages,
    ema_advantages,
    gae,
    group_ids,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    terminal_rewards,
)
from areal_agents.samples import Sample


def _ref_groups(rewards, gids):
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards, gids, strict=True):
        groups.setdefault(g, []).append(r)
    return groups


def ref_grpo(rewards, gids, std_normalize=True, eps=1e-6):
    groups = _ref_groups(rewards, gids)
    out = []
    for r, g in zip(rewards, gids, strict=True):
        rs = groups[g]
        if len(rs) < 2 or len(set(rs)) == 1:
            out.append(0.0)
            continue
        a = r - statistics.fmean(rs)
        out.append(a / (statistics.stdev(rs) + eps) if std_normalize else a)
    return out


def ref_rloo(rewards, gids):
    groups = _ref_groups(rewards, gids)
    out = []
    for r, g in zip(rewards, gids, strict=True):
        rs = groups[g]
        out.append(0.0 if len(rs) < 2 else r - (sum(rs) - r) / (len(rs) - 1))
    return out


def _random_case(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 20)
    gids_raw = [rng.randrange(6) for _ in range(n)]
    remap: dict[int, int] = {}
    gids = [remap.setdefault(g, len(remap)) for g in gids_raw]
    rewards = [
        float(rng.choice([0, 1, 2, 0.5])) if rng.random() < 0.7 else rng.gauss(0, 1)
        for _ in range(n)
    ]
    return rewards, gids


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("std_normalize", [True, False])
def test_grpo_matches_reference(seed, std_normalize):
    rewards, gids = _random_case(seed)
    got = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(gids),
                          std_normalize=std_normalize)  # fmt: skip
    assert got.tolist() == pytest.approx(ref_grpo(rewards, gids, std_normalize), abs=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_rloo_matches_reference(seed):
    rewards, gids = _random_case(seed)
    got = rloo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(gids))
    assert got.tolist() == pytest.approx(ref_rloo(rewards, gids), abs=1e-9)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 0, 0, 1, 2, 2])  # group 1 is alone, group 2 all equal
    a = 0.75 / 0.5  # mean 0.25, unbiased std 0.5
    b = -0.25 / 0.5
    assert grpo_advantages(r, g).tolist() == pytest.approx([a, b, b, b, 0, 0, 0], abs=1e-5)
    assert grpo_advantages(r, g, std_normalize=False).tolist() == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0, 0, 0]
    )
    # RLOO: 1 - 0 = 1; 0 - 1/3
    assert rloo_advantages(r, g).tolist() == pytest.approx(
        [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0], abs=1e-6
    )
    assert not torch.isnan(grpo_advantages(r, g)).any()


def test_reinforce_pp():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    sd = statistics.stdev([1, 2, 3, 6])
    expected = [(x - 3) / (sd + 1e-6) for x in (1, 2, 3, 6)]
    assert reinforce_pp_advantages(r).tolist() == pytest.approx(expected)
    # group-centred first: groups {1,3} and {2,6} -> x = [-1, -2, 1, 2]
    g = torch.tensor([0, 1, 0, 1])
    sd = statistics.stdev([-1, -2, 1, 2])
    assert reinforce_pp_advantages(r, g).tolist() == pytest.approx(
        [x / (sd + 1e-6) for x in (-1, -2, 1, 2)]
    )
    assert reinforce_pp_advantages(torch.tensor([5.0])).tolist() == [0.0]
    assert reinforce_pp_advantages(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_group_ids_key_by_group_and_role():
    s = [
        Sample([1], [1], [0.0], [0], group=g, agent=a)
        for g, a in (("t0", "x"), ("t0", "y"), ("t1", "x"), ("t0", "x"), ("", "y"))
    ]
    assert group_ids(s).tolist() == [0, 1, 2, 0, 3]


def test_ema_advantages():
    r = torch.tensor([1.0, 3.0, 10.0])
    adv, b = ema_advantages(r, ["p", "p", "q"], {"q": 6.0}, decay=0.75)
    assert adv.tolist() == [-1.0, 1.0, 4.0]
    assert b == {"q": 0.75 * 6 + 0.25 * 10, "p": 2.0}
    with pytest.raises(ValueError, match="got 3 rewards but 2 roles"):
        ema_advantages(r, ["p", "q"], {})
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        ema_advantages(r, ["p", "p", "q"], {}, decay=1.0)


def test_broadcast_and_terminal_rewards():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    adv = broadcast_advantages(torch.tensor([2.0, 3.0, -1.0]), mask)
    assert adv.tolist() == [[0, 2, 2, 0, 2, 0], [0] * 6, [-1, 0, 0, 0, 0, 0]]
    tr = terminal_rewards(torch.tensor([5.0, 7.0, 1.0]), mask)
    assert tr.tolist() == [[0, 0, 0, 0, 5, 0], [0] * 6, [1, 0, 0, 0, 0, 0]]


def ref_gae(rewards, values, mask, gamma, lam):
    """Per-row float64 GAE over the masked positions only."""
    out_a, out_r = [], []
    for r, v, m in zip(rewards, values, mask, strict=True):
        steps = [t for t, k in enumerate(m) if k]
        a_row, r_row = [0.0] * len(m), [0.0] * len(m)
        next_v, next_a = 0.0, 0.0
        for t in reversed(steps):
            delta = r[t] + gamma * next_v - v[t]
            a = delta + gamma * lam * next_a
            a_row[t], r_row[t] = a, a + v[t]
            next_v, next_a = v[t], a
        out_a.append(a_row)
        out_r.append(r_row)
    return out_a, out_r


def test_gae_by_hand():
    # tokens: prompt, gen, obs, gen ; values 0.5 and 0.25 at generated tokens; reward 1 at end
    mask = torch.tensor([[0, 1, 0, 1]])
    v = torch.tensor([[9.0, 0.5, 9.0, 0.25]], dtype=torch.float64)
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    adv, ret = gae(r, v, mask, gamma=0.5, gae_lambda=0.5)
    a3 = 1.0 - 0.25
    a1 = 0.0 + 0.5 * 0.25 - 0.5 + 0.25 * a3
    assert adv[0].tolist() == pytest.approx([0, a1, 0, a3])
    assert ret[0].tolist() == pytest.approx([0, a1 + 0.5, 0, a3 + 0.25])
    # gamma = lambda = 1: advantage is return minus value
    adv, ret = gae(r, v, mask, gamma=1.0, gae_lambda=1.0)
    assert ret[0].tolist() == pytest.approx([0, 1, 0, 1])


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(5, 8, generator=g) < 0.6).long()
    mask[seed] = 0
    v = torch.randn(5, 8, generator=g, dtype=torch.float64)
    r = torch.randn(5, 8, generator=g, dtype=torch.float64) * mask
    adv, ret = gae(r, v, mask, gamma=0.9, gae_lambda=0.7)
    ea, er = ref_gae(r.tolist(), v.tolist(), mask.tolist(), 0.9, 0.7)
    assert adv.tolist() == [pytest.approx(row, abs=1e-12) for row in ea]
    assert ret.tolist() == [pytest.approx(row, abs=1e-12) for row in er]


def test_masked_whiten():
    x = torch.tensor([[1.0, 100.0, 3.0], [5.0, 0.0, 0.0]])
    m = torch.tensor([[1, 0, 1], [1, 0, 0]])
    sd = statistics.stdev([1, 3, 5])
    out = masked_whiten(x, m)
    assert out.flatten().tolist() == pytest.approx([-2 / (sd + 1e-6), 0, 0, 2 / (sd + 1e-6), 0, 0])
    assert (masked_whiten(x, torch.zeros(2, 3)) == 0).all()
    assert not math.isnan(masked_whiten(torch.ones(2, 3), torch.ones(2, 3)).sum().item())
