"""2-process gloo runs of ArchonEngine must equal the single-process run after a step."""

from __future__ import annotations

import pytest

from .archon_helpers import assert_same_run, run_distributed, train_once

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["wq", "wv", "w2"]}
HEAD_LORA = {**LORA, "target_modules": ["wq", "wv", "w2", "lm_head"]}  # the head's adapter too
PARALLEL_KEYS = {"dp_shard", "tp", "pp", "ep", "sequence_parallel", "pp_schedule", "pp_microbatches",
                 "pp_stage_layers", "reshard_after_forward"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dp_shard": 2},
        {"dp_shard": 2, "reshard_after_forward": False, "compile": "eager"},
        {"tp": 2},
        {"tp": 2, "sequence_parallel": True},
        {"dp_shard": 2, "lora": LORA},
        {"tp": 2, "lora": LORA},
        {"dp_shard": 2, "lora": HEAD_LORA},
        {"tp": 2, "lora": HEAD_LORA},
    ],
    ids=["fsdp2", "fsdp2-noreshard-compile", "tp2", "tp2-sp", "fsdp2-lora", "tp2-lora",
         "fsdp2-lora-head", "tp2-lora-head"],
)
def test_two_process_equals_single(tmp_path, kwargs):
    single = train_once({k: v for k, v in kwargs.items() if k not in PARALLEL_KEYS})
    results = run_distributed(train_once, 2, str(tmp_path), engine_kwargs=kwargs)
    assert results[1]["weights"] == {}  # only rank 0 yields exported weights
    assert_same_run(single, results[0])
    assert results[0]["stats"][0]["loss"] == results[1]["stats"][0]["loss"]


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble", "InterleavedZeroBubble"])
def test_pipeline_two_stages_equal_single(tmp_path, schedule):
    model_args = {"n_layers": 4}
    single = train_once({"model_args": model_args}, steps=2)
    kwargs = {"pp": 2, "pp_schedule": schedule, "model_args": model_args}
    results = run_distributed(train_once, 2, str(tmp_path), steps=2, engine_kwargs=kwargs)
    assert_same_run(single, results[0])
    assert results[0]["stats"][1]["loss"] == results[1]["stats"][1]["loss"]
    assert (results[0]["logprobs"] == results[1]["logprobs"]).all()


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble",
                                      "InterleavedZeroBubble"])
def test_pipeline_with_a_head_adapter_equals_single(tmp_path, schedule):
    # zero-bubble schedules assign weight gradients themselves: B's gradient (a column slice
    # of the stacked head weight's) must reach the fused AdamW contiguous
    # (archon.optim.contiguous_grads, called by PipelineRunner.train_step)
    model_args = {"n_layers": 4}
    single = train_once({"model_args": model_args, "lora": HEAD_LORA}, steps=2)
    kwargs = {"pp": 2, "pp_schedule": schedule, "model_args": model_args, "lora": HEAD_LORA}
    results = run_distributed(train_once, 2, str(tmp_path), steps=2, engine_kwargs=kwargs)
    assert_same_run(single, results[0])


def test_zbv_uneven_stage_layers_equal_single(tmp_path):
    """A V split with a last stage holding only the final norm and the LM-head loss."""
    model_args = {"n_layers": 4}
    single = train_once({"model_args": model_args})
    kwargs = {"pp": 2, "pp_schedule": "ZBVZeroBubble", "pp_microbatches": 4,
              "pp_stage_layers": [1, 2, 1, 0], "model_args": model_args}
    results = run_distributed(train_once, 2, str(tmp_path), engine_kwargs=kwargs)
    assert_same_run(single, results[0])


def test_expert_parallel_equals_single(tmp_path):
    from .archon_helpers import train_moe_once

    single = train_moe_once({}, steps=2)
    results = run_distributed(train_moe_once, 2, str(tmp_path), steps=2,
                              engine_kwargs={"dp_shard": 2, "ep": 2})
    assert_same_run(single, results[0])
    assert "model.layers.0.mlp.experts.gate_up_proj" in results[0]["weights"]  # served layout


def test_fsdp_checkpoint_resume(tmp_path):
    from .archon_helpers import save_then_resume

    results = run_distributed(save_then_resume, 2, str(tmp_path), engine_kwargs={"dp_shard": 2},
                              path=str(tmp_path / "ckpt"))
    la, lb = results[0]["losses"]
    assert la == lb and results[0]["step"] == 2
    assert results[0]["n"] > 0 and results[0]["diff"] == 0.0
    assert (tmp_path / "ckpt" / "meta.pt").exists() and (tmp_path / "ckpt" / "rng_1.pt").exists()
