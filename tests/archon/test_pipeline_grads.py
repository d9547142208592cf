"""Strided gradients under the zero-bubble pipeline schedules: the weight pass assigns them to
``param.grad`` as autograd made them, and ``optim.contiguous_grads`` (called by
``PipelineRunner.train_step``) makes them contiguous before the fused AdamW step reads them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from areal_agents.trainers.archon.optim import contiguous_grads

from .archon_helpers import TINY_ARGS, assert_same_run, make_batch, pg_loss, run_distributed


class ColumnSplitLinear(nn.Module):
    """A bias-free linear whose ``[out, in]`` weight is two parameters joined by columns:
    ``left [out, k]`` and ``right_t [in - k, out]`` (stored transposed). The joined weight's
    gradient reaches ``left`` as a column slice and ``right_t`` as a transposed slice, both
    strided."""

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.left = nn.Parameter(w[:, :k].clone())
        self.right_t = nn.Parameter(w[:, k:].t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.cat([self.left, self.right_t.t()], 1))


def split_model(n_layers: int = 4):
    """The tiny Archon model with layer 1's ``feed_forward.w2`` as a ``ColumnSplitLinear``
    (same function: the split weight equals the original)."""
    from areal_agents.trainers.archon import ModelArgs
    from areal_agents.trainers.archon.models import Transformer

    model = Transformer(ModelArgs(**{**TINY_ARGS, "n_layers": n_layers}))
    model.init_weights(seed=0)
    ff = model.layers["1"].feed_forward
    ff.w2 = ColumnSplitLinear(ff.w2, k=40)
    return model


def train_split(engine_kwargs: dict, steps: int = 2) -> dict:
    """``archon_helpers.train_once`` for ``split_model``, with the weights as Archon names
    (``full_state_dict``: the split parameters have no HF name; all ranks get them)."""
    from areal_agents.trainers.archon import ArchonEngine

    engine = ArchonEngine(split_model(), lr=1e-2, eps=1e-6, **engine_kwargs)
    batch = make_batch(vocab=TINY_ARGS["vocab_size"], lengths=(12, 9, 16, 5, 7, 14))
    stats = [engine.train_step(batch, pg_loss) for _ in range(steps)]
    return {"stats": stats, "logprobs": engine.forward_logprobs(batch),
            "weights": {n: t.detach().clone() for n, t in engine.full_state_dict()}}


def test_a_split_backward_weight_pass_leaves_strided_gradients_that_the_guard_copies():
    """The premise of the pipeline test below: the weight pass (``stage_backward_weight``)
    assigns ``ColumnSplitLinear``'s gradients strided, where ``loss.backward()`` accumulates
    them contiguous; ``contiguous_grads`` copies exactly those two, with the same values."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    torch.manual_seed(0)
    layer = ColumnSplitLinear(nn.Linear(10, 6, bias=False), k=4)
    plain = nn.Linear(6, 6, bias=False)  # an ordinary weight: its weight-pass gradient is contiguous
    x = torch.randn(3, 10, requires_grad=True)
    weights = [layer.left, layer.right_t, plain.weight]
    loss = plain(layer(x)).pow(2).sum()
    _, groups = stage_backward_input([loss], None, [x], iter(weights))
    stage_backward_weight(iter(weights), groups)
    assert [p.grad.is_contiguous() for p in weights] == [False, False, True]
    ref = [p.detach().clone().requires_grad_() for p in weights]
    F.linear(F.linear(x.detach(), torch.cat([ref[0], ref[1].t()], 1)), ref[2]).pow(2).sum().backward()
    kept = plain.weight.grad

    assert contiguous_grads(weights) == 2
    assert all(p.grad.is_contiguous() for p in weights)
    assert plain.weight.grad is kept  # contiguous gradients are not copied
    for p, r in zip(weights, ref, strict=True):
        assert torch.allclose(p.grad, r.grad, atol=1e-5)


def test_fused_adamw_after_the_guard_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    joined = torch.randn(4, 10)
    strided = [joined[:, 4:], joined[:, :4].t(), torch.randn(5)]  # two views, one plain
    params = [nn.Parameter(torch.ones(g.shape)) for g in strided]
    refs = [nn.Parameter(torch.ones(g.shape)) for g in strided]
    empty = nn.Parameter(torch.ones(2))  # no gradient: left alone
    for p, r, g in zip(params, refs, strided, strict=True):
        p.grad, r.grad = g, g.clone()
    assert contiguous_grads([*params, empty]) == 2
    assert empty.grad is None
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    torch.optim.AdamW(refs, lr=0.1, foreach=False).step()
    for p, r in zip(params, refs, strict=True):
        assert torch.equal(p.detach(), r.detach())


def _dtensor_grads() -> list[bool]:
    """Worker of a 1-rank group: a ``Shard(0)`` DTensor gradient whose global strides read
    contiguous but whose local tensor is a column slice. Returns (copied?, local contiguous
    after, values kept, shape kept)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (1,))
    joined = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(DTensor.from_local(torch.ones(4, 6), mesh, [Shard(0)]))
    p.grad = DTensor.from_local(joined[:, 4:], mesh, [Shard(0)], run_check=False,
                                shape=(4, 6), stride=(6, 1))
    assert p.grad.is_contiguous() and not p.grad.to_local().is_contiguous()
    copied = contiguous_grads([p])
    return [copied == 1, p.grad.to_local().is_contiguous(),
            torch.equal(p.grad.to_local(), joined[:, 4:]), tuple(p.grad.shape) == (4, 6)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_dtensor_gradient_is_judged_by_its_local_tensor(tmp_path):
    assert run_distributed(_dtensor_grads, 1, str(tmp_path)) == [[True, True, True, True]]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "InterleavedZeroBubble"])
def test_zero_bubble_steps_strided_gradients_like_one_process(tmp_path, schedule):
    """Two fused-AdamW steps of a model with parameters whose gradients come out strided
    (``ColumnSplitLinear`` in layer 1) equal the one-process run; without the guard, the split
    parameters' updates differ (``left`` and ``right_t`` read the wrong gradient entries)."""
    single = train_split({})
    results = run_distributed(train_split, 2, str(tmp_path),
                              engine_kwargs={"pp": 2, "pp_schedule": schedule})
    assert {"layers.1.feed_forward.w2.left", "layers.1.feed_forward.w2.right_t"} <= set(single["weights"])
    assert_same_run(single, results[0])
    assert_same_run(single, results[1])
