"""Groups of one zero every group-relative advantage: refused with a ConfigError naming fixes."""

from __future__ import annotations

import pytest

import areal_agents as aa
from areal_agents.algorithms import ALGORITHMS, check_group_size
from areal_agents.errors import ConfigError

SAMPLING = {"temperature": 1.0, "max_tokens": 1}
GROUP_RELATIVE = {"grpo", "drgrpo", "dapo", "rloo", "gspo", "cispo", "sapo"}


def make_trainer(algorithm, group_size, **speaker):
    return aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"s": aa.Policy(sampling=SAMPLING, api="completions", algorithm_params=speaker),
                  "l": aa.Policy(sampling=SAMPLING, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, algorithm=algorithm,
        batch_size=4, group_size=group_size, progress=False)  # fmt: skip


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_flag_matches_the_estimator(name):
    assert ALGORITHMS[name]().group_relative is (name in GROUP_RELATIVE)
    if name != "ppo":
        assert not ALGORITHMS[name](baseline="ema").group_relative


def test_trainer_refuses_group_relative_with_groups_of_one():
    with pytest.raises(ConfigError) as err:
        make_trainer("grpo", group_size=1)
    assert str(err.value) == (
        "GRPO compares each episode with the others of its task group, so group_size=1 makes "
        "every advantage 0; set group_size >= 2, or GRPO(baseline='ema') (per-role "
        "moving-average baseline), or use ReinforcePlusPlus (batch-normalised, "
        "group_baseline=False)"
    )
    # the fixes it names are accepted
    make_trainer(aa.GRPO(baseline="ema"), group_size=1)
    make_trainer("reinforce++", group_size=1)
    make_trainer("ppo", group_size=1)
    make_trainer("grpo", group_size=2)


def test_trainer_checks_each_policys_own_algorithm():
    # the shared algorithm is fine; one policy's override turns the group baseline on
    with pytest.raises(ConfigError, match="ReinforcePlusPlus compares each episode"):
        make_trainer("reinforce++", group_size=1, group_baseline=True)


def test_objects_without_the_flag_are_not_checked():
    check_group_size(object(), 1)
