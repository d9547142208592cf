"""reward_fns in YAML: judges, reward models and imported functions named in a run config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from areal_agents.config import load_config, parse_config
from areal_agents.errors import ConfigError
from areal_agents.rewards import GroupJudge, ReferenceJudge, RubricJudge
from areal_agents.rewards.from_config import build_reward_fns, check_reward_spec
from areal_agents.rewards.reward_model import RewardModel, RewardModelReward
from areal_agents.trainers import trainer as trainer_module

EXAMPLE = Path(__file__).parents[2] / "examples" / "genrm" / "judge" / "judge_reward.yaml"


def length_reward(episode: Any) -> float:
    """A plain reward function, named in a test config by import path."""
    return 0.0


class ScaledReward:
    """A reward class, built from a config entry with its arguments."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


def _built_kwargs(monkeypatch, cfg) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(trainer_module, "Trainer", lambda **kw: seen.update(kw))
    cfg.build()
    return seen


def test_the_example_yaml_names_a_reference_judge(monkeypatch, tmp_path) -> None:
    cfg = load_config(EXAMPLE, ["policies.judge.model=tiny:xs", f"run_dir={tmp_path}"])
    kwargs = _built_kwargs(monkeypatch, cfg)
    (judge,) = kwargs["reward_fns"]
    assert kwargs["group_reward_fns"] == []
    assert isinstance(judge, ReferenceJudge)
    assert (judge.name, judge.policy, judge.on_failure, judge.fallback) == (
        "judge", "judge", "fallback", 0.0)
    assert judge.template == "Reference: {reference}\n{answer}\nCorrect:"
    assert cfg.policies["judge"].frozen and "judge" not in cfg.policy_map.values()


def test_group_judges_imports_and_reward_models_are_built(tmp_path) -> None:
    RewardModel.from_pretrained("tiny:xs").save(tmp_path / "rm")
    fns, group_fns = build_reward_fns([
        {"type": "rubric_judge", "policy": "j", "rubric": "Be right.", "scale": [0, 5]},
        {"type": "group_judge", "policy": "j"},
        {"type": "reward_model", "path": str(tmp_path / "rm"), "normalize": "sigmoid"},
        {"type": f"{__name__}:length_reward"},
        {"type": f"{__name__}:ScaledReward", "scale": 2.0},
        {"type": f"{__name__}:length_reward", "group": True},
    ])
    rubric, rm, fn, scaled = fns
    assert isinstance(rubric, RubricJudge) and rubric.scale == (0, 5)
    assert isinstance(rm, RewardModelReward) and rm.normalize == "sigmoid"
    assert fn is length_reward and isinstance(scaled, ScaledReward) and scaled.scale == 2.0
    assert isinstance(group_fns[0], GroupJudge) and group_fns[1] is length_reward


@pytest.mark.parametrize(("spec", "message"), [
    ({"policy": "judge"}, "a reward_fns entry needs a 'type'"),
    ({"type": "llm_judge"}, "unknown reward type 'llm_judge'; choose one of ['group_judge', "
     "'reference_judge', 'reward_model', 'rubric_judge'] or give 'module:attr'"),
    ({"type": "reference_judge", "policy": "judge", "temperature": 0},
     "reward type 'reference_judge' takes no argument(s) ['temperature']"),
    ({"type": "rubric_judge", "rubric": "x"}, "reward type 'rubric_judge' needs policy"),
    ({"type": "reference_judge", "policy": "grader"},
     "reward type 'reference_judge' calls policy 'grader', which is not in policies "
     "['judge', 'solver']; add it (frozen: true) or fix the name"),
    ({"type": "reward_model", "normalize": "sigmoid"}, "reward type 'reward_model' needs path"),
])
def test_bad_entries_fail_when_the_config_is_parsed(spec, message) -> None:
    with pytest.raises(ValueError, match=None) as err:
        check_reward_spec(spec, ["judge", "solver"])
    assert message in str(err.value)
    data = {"env": "Arithmetic-v0", "policies": {"solver": {}, "judge": {"frozen": True}},
            "policy_map": {"agent": "solver"}, "reward_fns": [spec]}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "reward_fns[0]: " + message in str(err.value)


def test_an_import_path_that_does_not_resolve_names_it() -> None:
    with pytest.raises(ValueError, match=r"reward type 'areal_agents.rewards:nope': "
                                         r"areal_agents.rewards has no 'nope'"):
        build_reward_fns([{"type": "areal_agents.rewards:nope"}])
