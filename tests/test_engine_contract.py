"""Validation in the engine contract's request types."""

import pytest
import torch

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"n": 0}, "n must be >= 1, got 0"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, text):
    with pytest.raises(ValueError, match=text):
        SamplingParams(**kwargs)


def test_requests_get_unique_ids():
    a, b = GenerateRequest([1, 2]), GenerateRequest([1, 2])
    assert a.request_id != b.request_id
    assert a.sampling.max_tokens == 256


def test_weight_update_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of named_tensors= or path="):
        WeightUpdate()
    with pytest.raises(ValueError, match="exactly one"):
        WeightUpdate(named_tensors=[("w", torch.zeros(1))], path="/tmp/x")
    assert WeightUpdate(path="/tmp/x", version=4).version == 4
