"""``Policy.sft_target_loss``: the warm start stops once the mean loss of its last
``SFT_LOSS_WINDOW`` steps is below the target; bad values are refused."""

from __future__ import annotations

import math

import pytest
import torch

from areal_agents.config import load_config
from areal_agents.errors import ConfigError
from areal_agents.models import tiny
from areal_agents.samples import Sample
from areal_agents.trainers.fsdp.engine import FSDPEngine
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.warm_start import (
    SFT_LOSS_WINDOW,
    sft,
    warm_start_label,
    warm_start_metrics,
    warm_start_plan,
)


class ScriptedLossEngine:
    """Returns the next loss of a fixed curve at each step; records each batch's first ids."""

    def __init__(self, curve: list[float]):
        self.curve, self.batches = curve, []

    def train_step(self, batch, loss_fn):
        self.batches.append(batch.input_ids[:, 0].tolist())
        return {"loss": self.curve[len(self.batches) - 1]}


SAMPLES = [Sample([k, 1, 2], [0, 1, 1], [0.0] * 3, [-1] * 3) for k in range(10, 17)]
CURVE = [10.0 - 0.5 * i for i in range(30)]  # 10.0, 9.5, ..., -4.5


def test_stops_at_the_first_step_whose_window_mean_is_below_the_target():
    assert SFT_LOSS_WINDOW == 10
    # means of the last 10 steps after step n (n >= 10): 10 - 0.5 * (n - 1) + 2.25 = 12.75 - 0.5 n
    # < 5.0 first at n = 16 (4.75); at n = 15 it is 5.25
    engine = ScriptedLossEngine(CURVE)
    losses = sft(engine, SAMPLES, steps=30, batch_size=3, seed=0, target_loss=5.0)
    assert losses == CURVE[:16] and len(engine.batches) == 16
    full = ScriptedLossEngine(CURVE)
    assert sft(full, SAMPLES, steps=30, batch_size=3, seed=0) == CURVE
    assert engine.batches == full.batches[:16]  # the same batches as the first steps of a full run


def test_no_stop_before_a_full_window_nor_when_the_target_is_not_reached():
    low = [0.1] * 12  # below the target from the first step: still a full window first
    assert len(sft(ScriptedLossEngine(low), SAMPLES, 12, 3, target_loss=1.0)) == SFT_LOSS_WINDOW
    assert sft(ScriptedLossEngine(CURVE), SAMPLES, 20, 3, target_loss=-100.0) == CURVE[:20]


def test_a_real_warm_start_stops_early_with_the_target_and_not_without():
    ids = [[5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 3]]
    samples = [Sample(i, [0, 0, 1, 1], [0.0] * 4, [-1, -1, 0, 0]) for i in ids]
    torch.manual_seed(0)
    model, _ = tiny("xs", seed=0)
    full = sft(FSDPEngine(model, lr=3e-3), samples, steps=60, batch_size=3, seed=0)
    target = sum(full[20:30]) / 10 + 1e-6  # reached by step 30 of the full run
    model, _ = tiny("xs", seed=0)
    early = sft(FSDPEngine(model, lr=3e-3), samples, steps=60, batch_size=3, seed=0,
                target_loss=target)
    assert SFT_LOSS_WINDOW <= len(early) <= 30 < len(full) == 60
    assert sum(early[-10:]) / 10 < target
    assert early == pytest.approx(full[: len(early)], abs=1e-5)


class _Tok:
    pad_token_id, eos_token = 0, "</s>"

    def convert_tokens_to_ids(self, token):
        return 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 50) for c in text]}


def test_the_policy_field_reaches_the_plan_and_bad_values_are_refused():
    transcripts = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}]]
    plan = warm_start_plan(Policy(model="tiny:xs", sft_steps=5, sft_target_loss=0.6,
                                  api="completions"), _Tok(), transcripts)
    assert plan is not None and (plan.steps, plan.target_loss) == (5, 0.6)
    assert Policy(model="tiny:xs").sft_target_loss is None
    for bad in (0.0, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="sft_target_loss"):
            Policy(model="tiny:xs", sft_steps=5, sft_target_loss=bad)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "low"])
def test_a_bad_sft_target_loss_in_the_yaml_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"policies\.base\.sft_target_loss"):
        load_config("examples/signaling/lora_per_role.yaml",
                    [f"policies.base.sft_target_loss={value}"])


def test_the_yaml_option_reaches_the_policy():
    config = load_config("examples/signaling/lora_per_role.yaml",
                         ["policies.base.sft_target_loss=0.6"])
    assert config.policies["base"].sft_target_loss == 0.6


def test_the_logged_metrics_and_start_up_label_say_where_a_warm_start_stopped():
    losses = [3.0] + [1.0] * 10 + [0.5] * 4  # stopped after 15 steps
    metrics = warm_start_metrics("p", losses)
    assert metrics == {"warm_start/p/nll_first": 3.0, "warm_start/p/nll_last": 0.5,
                       "warm_start/p/nll_last_mean": pytest.approx(0.8),
                       "warm_start/p/steps": 15.0}
    assert warm_start_metrics("p", []) == {}
    assert warm_start_label(450, None) == "450 steps"
    assert warm_start_label(450, 0.6) == "up to 450 steps, until the 10-step mean loss < 0.6"
