"""2-process gloo runs of ArchonEngine must equal the single-process run after a step."""

from __future__ import annotations

import pytest
from archon_helpers import assert_same_run, run_distributed, train_once

pytestmark = pytest.mark.multiprocess

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["wq", "wv", "w2"]}
PARALLEL_KEYS = {"dp_shard", "tp", "pp", "ep", "sequence_parallel", "pp_schedule", "pp_microbatches"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dp_shard": 2},
        {"tp": 2},
        {"tp": 2, "sequence_parallel": True},
        {"dp_shard": 2, "lora": LORA},
        {"tp": 2, "lora": LORA},
    ],
    ids=["fsdp2", "tp2", "tp2-sp", "fsdp2-lora", "tp2-lora"],
)
def test_two_process_equals_single(tmp_path, kwargs):
    single = train_once({k: v for k, v in kwargs.items() if k not in PARALLEL_KEYS})
    results = run_distributed(train_once, 2, str(tmp_path), engine_kwargs=kwargs)
    assert results[1]["weights"] == {}  # only rank 0 yields exported weights
    assert_same_run(single, results[0])
    assert results[0]["stats"][0]["loss"] == results[1]["stats"][0]["loss"]
