"""Algorithm details the mutation run found untested (exact messages, edge cases); the
numerical behaviour is tested in tests/algorithms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from areal_agents.algorithms.filtering import overlong_penalty
from areal_agents.algorithms.registry import ALGORITHMS, check_algorithm, resolve
from areal_agents.algorithms.soft_clip import cispo_policy_loss, sapo_policy_loss


def test_registry_messages():
    assert check_algorithm("grpo") == "grpo"
    with pytest.raises(ValueError) as info:
        check_algorithm("GRPO")  # configs spell names exactly
    assert str(info.value) == f"unknown algorithm 'GRPO'; allowed: {list(ALGORITHMS)}"
    with pytest.raises(ValueError) as info:
        resolve("nope")
    assert str(info.value) == f"unknown algorithm 'nope'; allowed: {list(ALGORITHMS)}"
    algo = resolve("GrPo")
    with pytest.raises(ValueError) as info:
        resolve(algo, kl_coef=0.1, clip_eps=0.2)
    assert str(info.value) == (f"got an algorithm object ({type(algo).__name__}) and arguments "
                               "['clip_eps', 'kl_coef']; set them on the object instead")


def test_state_dict_round_trip_and_unknown_keys():
    algo = resolve("grpo")
    algo.ema_baselines = {"a": 0.5}
    state = algo.state_dict()
    assert state == {"ema_baselines": {"a": 0.5}}
    state["ema_baselines"]["a"] = 9.0  # a copy: the algorithm's state is not aliased
    assert algo.ema_baselines == {"a": 0.5}
    other = resolve("dapo")
    other.ema_baselines = {"old": 1.0}
    other.load_state_dict({"ema_baselines": {"b": 1, 2: "0.25"}})
    assert other.ema_baselines == {"b": 1.0, "2": 0.25}
    assert all(type(v) is float for v in other.ema_baselines.values())
    other.load_state_dict({})  # a missing entry means empty
    assert other.ema_baselines == {}
    with pytest.raises(ValueError) as info:
        other.load_state_dict({"ema_baselines": {}, "zeta": 1, "alpha": 2})
    assert str(info.value) == ("DAPO.load_state_dict: unknown keys ['alpha', 'zeta']; "
                               "expected only 'ema_baselines'")


# ---- soft-clip losses, filtering, base-class messages ---------------------------------------

def loss_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5)
    behave = -torch.rand(shape, generator=g)
    prox = behave + 0.3 * torch.randn(shape, generator=g)
    logp = prox + 0.4 * torch.randn(shape, generator=g)
    mask = torch.ones(shape)
    mask[0, :2] = 0
    weights = mask / mask.sum()
    adv = torch.tensor([[1.0] * 5, [-1.0] * 5, [0.5] * 5])
    return {"logp": logp, "prox": prox, "behave": behave, "advantages": adv,
            "loss_mask": mask, "loss_weights": weights, "stat_weights": weights}


def call(fn, inputs, **kw):
    return fn(inputs["logp"], inputs["prox"], inputs["behave"], inputs["advantages"],
              inputs["loss_mask"], inputs["loss_weights"], inputs["stat_weights"], **kw)


def test_cispo_and_sapo_defaults_and_stats():
    x = loss_inputs()
    loss, stats = call(cispo_policy_loss, x)
    ref, _ = call(cispo_policy_loss, x, clip_eps=1.0, clip_eps_high=0.28,
                  behave_imp_weight_cap=None, behave_imp_weight_mode="mask")
    torch.testing.assert_close(loss, ref)
    assert stats["pg_loss"] == loss
    loss, stats = call(sapo_policy_loss, x)
    ref, _ = call(sapo_policy_loss, x, tau_pos=1.0, tau_neg=1.05)
    torch.testing.assert_close(loss, ref)
    assert stats["pg_loss"] == loss


@pytest.mark.parametrize("fn", [cispo_policy_loss, sapo_policy_loss])
def test_soft_clip_losses_pass_the_behaviour_cap_on(fn):
    x = loss_inputs(1)
    free, _ = call(fn, x)
    masked, _ = call(fn, x, behave_imp_weight_cap=1.05)
    clamped, _ = call(fn, x, behave_imp_weight_cap=1.05, behave_imp_weight_mode="clamp")
    assert not torch.allclose(free, masked) and not torch.allclose(masked, clamped)


@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_soft_clip_objects_pass_their_settings_on(name):
    x = loss_inputs(2)
    fn = cispo_policy_loss if name == "cispo" else sapo_policy_loss
    extra = ({"clip_eps": 0.5, "clip_eps_high": 0.1} if name == "cispo"
             else {"tau_pos": 2.0, "tau_neg": 3.0})
    algo = resolve(name, behave_imp_weight_cap=1.05, behave_imp_weight_mode="clamp", **extra)
    batch = SimpleNamespace(old_logprobs=x["behave"], advantages=x["advantages"],
                            loss_mask=x["loss_mask"])
    got, _ = algo._policy_loss(x["logp"], x["prox"], batch, x["loss_weights"],
                               x["stat_weights"])
    ref, _ = call(fn, x, behave_imp_weight_cap=1.05, behave_imp_weight_mode="clamp", **extra)
    torch.testing.assert_close(got, ref)


def test_cispo_clip_eps_high_defaults_to_clip_eps():
    x = loss_inputs(3)
    algo = resolve("cispo", clip_eps=0.2, clip_eps_high=None)
    batch = SimpleNamespace(old_logprobs=x["behave"], advantages=x["advantages"],
                            loss_mask=x["loss_mask"])
    got, _ = algo._policy_loss(x["logp"], x["prox"], batch, x["loss_weights"],
                               x["stat_weights"])
    ref, _ = call(cispo_policy_loss, x, clip_eps=0.2, clip_eps_high=0.2)
    torch.testing.assert_close(got, ref)


def test_sapo_gates_zero_advantages_with_tau_neg():
    x = loss_inputs(4)
    x["advantages"] = torch.zeros(3, 5)  # tau = tau_pos only where A > 0
    _, neg5 = call(sapo_policy_loss, x, tau_pos=1.0, tau_neg=5.0)
    _, neg1 = call(sapo_policy_loss, x, tau_pos=5.0, tau_neg=1.0)
    _, pos5 = call(sapo_policy_loss, x, tau_pos=5.0, tau_neg=5.0)
    torch.testing.assert_close(neg5["soft_gate"], pos5["soft_gate"])
    assert not torch.allclose(neg1["soft_gate"], pos5["soft_gate"])


def test_soft_clip_messages():
    with pytest.raises(ValueError) as info:
        resolve("cispo", dual_clip_c=3.0)
    assert str(info.value) == ("CISPO.dual_clip_c does not apply (no token is clipped); leave "
                               "it None")
    with pytest.raises(ValueError) as info:
        resolve("sapo", dual_clip_c=3.0)
    assert str(info.value) == ("SAPO.dual_clip_c does not apply (the gate replaces the clip); "
                               "leave it None")
    for bad in ({"tau_pos": 0.0}, {"tau_neg": 0.0}):
        with pytest.raises(ValueError, match=r"SAPO\.tau_pos and tau_neg must be > 0"):
            resolve("sapo", **bad)
    assert resolve("sapo", tau_pos=0.5, tau_neg=0.5).tau_neg == 0.5


def test_base_class_has_no_group_advantages():
    from areal_agents.algorithms.objects import PolicyGradient

    with pytest.raises(NotImplementedError) as info:
        PolicyGradient()._group_advantages(torch.zeros(2), torch.zeros(2))
    assert str(info.value) == (
        "PolicyGradient is the shared base; use GRPO, DrGRPO, RLOO, ReinforcePlusPlus, PPO, "
        "DAPO or GSPO (or subclass it and define _group_advantages)")


@pytest.mark.parametrize(("length", "expected"), [
    (0, 0.0), (6, 0.0), (7, -1.0), (8, -2.0), (9, -2.0), (100, -2.0)])
def test_overlong_penalty_edges(length, expected):
    assert overlong_penalty(length, max_response_len=8, overlong_buffer_len=2,
                            penalty_factor=2.0) == expected


def test_overlong_penalty_buffer_bounds():
    assert overlong_penalty(5, max_response_len=8, overlong_buffer_len=1) == 0.0
    assert overlong_penalty(8, max_response_len=8, overlong_buffer_len=8) == -1.0
    for bad in (0, 9):
        with pytest.raises(ValueError) as info:
            overlong_penalty(5, max_response_len=8, overlong_buffer_len=bad)
        assert str(info.value) == (f"overlong_buffer_len must be in (0, max_response_len=8], "
                                   f"got {bad}")
