"""FP8 (torchao float8): import-safe on CPU with a clear error; the real run needs CUDA."""

from __future__ import annotations

import pytest
import torch

from areal_agents.errors import ConfigError
from areal_agents.trainers.archon import ArchonEngine, ModelArgs
from areal_agents.trainers.archon.fp8 import _eligible, fp8_supported

from .archon_helpers import TINY_ARGS, make_batch, pg_loss


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_fp8_on_cpu_raises_clear_error():
    assert not fp8_supported()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        ArchonEngine(ModelArgs(**TINY_ARGS), fp8=True)


def test_fp8_filter_keeps_head_and_odd_shapes():
    assert _eligible(torch.nn.Linear(64, 128), "layers.0.attention.wq")
    assert not _eligible(torch.nn.Linear(64, 96 + 8), "layers.0.feed_forward.w1")
    assert not _eligible(torch.nn.Linear(64, 128), "output")


@pytest.mark.cuda
@pytest.mark.skipif(not fp8_supported(), reason="needs CUDA SM 8.9+ and torchao")
def test_fp8_training_step_on_cuda():
    args = ModelArgs(**{**TINY_ARGS, "hidden_dim": 128})
    engine = ArchonEngine(args, fp8=True, device="cuda", lr=1e-3)
    stats = engine.train_step(make_batch(), pg_loss)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert type(engine.model.layers["0"].attention.wqkv).__name__ == "Float8Linear"
