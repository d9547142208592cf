"""The shared train-step loop (``trainers/step.py``): the per-rank planner as a pure function,
the accumulate/step seam with fakes, and FSDP/Archon steps bitwise equal to a plain loop."""

from __future__ import annotations

import copy

import pytest
import torch

from areal_agents.errors import ConfigError, TrainError
from areal_agents.models import tiny
from areal_agents.samples import Sample, TokenBatch, collate
from areal_agents.trainers.archon import ArchonEngine
from areal_agents.trainers.archon.optim import clip_grads
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.microbatch import plan_microbatches
from areal_agents.trainers.schedules import check_lr_schedule
from areal_agents.trainers.step import (
    MicroBatchSlot,
    accumulate_microbatches,
    plan_rank_microbatches,
    rank_microbatches,
    run_train_step,
    with_fillers,
)

TOKEN_BUDGET = 40
ENGINE_KWARGS = dict(lr=1e-2, max_grad_norm=0.005, warmup_steps=2, lr_schedule="cosine",
                     total_steps=4, token_budget=TOKEN_BUDGET)


def _batch(vocab: int, lengths=(12, 9, 16, 5, 7, 14), seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        n_prompt = n // 3
        old = (-6.8 + 0.3 * torch.randn(n - n_prompt, generator=g)).tolist()  # ratios near 1
        samples.append(Sample(ids, [0] * n_prompt + [1] * (n - n_prompt), [0.0] * n_prompt + old,
                              [0] * n, reward=1.0))
    batch = collate(samples, temperature=0.9)
    batch.advantages = torch.randn(batch.input_ids.shape, generator=g) * batch.loss_mask
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    return batch


def _loss(logprobs, entropy, mb):
    """A PPO-clip loss with two summed stats (conforms to ``LossFn``)."""
    ratio = torch.exp((logprobs - mb.old_logprobs) * mb.loss_mask)
    clipped = ratio.clamp(0.8, 1.2)
    loss = (-torch.minimum(ratio * mb.advantages, clipped * mb.advantages) * mb.loss_weights).sum()
    clip_frac = ((ratio != clipped).float() * mb.loss_weights).sum()
    return loss, {"entropy": (entropy * mb.loss_weights).sum().detach(), "clip_frac": clip_frac}


def _reference_steps(module, optimizer, scheduler, clip, batch, steps, aux_loss=None):
    """The pre-refactor single-process step written out plainly: stats summed in float32 over
    the token-budget micro-batches, one backward each, clip, optimizer and LR step."""
    lengths = batch.attention_mask.sum(-1).tolist()
    plans = plan_microbatches(lengths, TOKEN_BUDGET)
    assert len(plans) > 1
    history = []
    for _ in range(steps):
        module.train()
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for idx in plans:
            mb = batch.select(torch.tensor(idx))
            lp, ent = module(mb.input_ids, mb.attention_mask, mb.temperature)
            loss, stats = _loss(lp, ent, mb)
            parts = {"loss": loss, **stats}
            aux = aux_loss() if aux_loss is not None else None
            if aux is not None:
                parts["aux_loss"] = aux / len(plans)
                loss = loss + aux / len(plans)
            loss.backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, torch.zeros(())) + v.detach().float()
        out = {k: float(v) for k, v in totals.items()}
        grad_norm = clip()
        out.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                   num_tokens=float(batch.num_tokens), skipped=0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(out)
    return history


def _assert_bitwise(got_stats, want_stats, got_params, want_params):
    assert got_stats == want_stats
    assert got_params.keys() == want_params.keys()
    for name, p in want_params.items():
        assert torch.equal(got_params[name], p), name


def test_fsdp_two_steps_equal_the_reference_loop_bitwise():
    model, _ = tiny("xs", seed=0)
    batch = _batch(model.config.vocab_size)
    engine = FSDPEngine(copy.deepcopy(model), **ENGINE_KWARGS)
    got = [engine.train_step(batch, _loss) for _ in range(2)]

    ref = FSDPEngine(copy.deepcopy(model), **ENGINE_KWARGS)  # its module/optimizer, our loop
    params = [p for p in ref.module.parameters() if p.requires_grad]

    def clip() -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, ENGINE_KWARGS["max_grad_norm"]))

    want = _reference_steps(ref.module, ref.optimizer, ref.scheduler, clip, batch, 2)
    assert want[0]["grad_norm"] > ENGINE_KWARGS["max_grad_norm"]  # clipping is exercised
    assert want[0]["lr"] != want[1]["lr"]  # so is the schedule
    assert engine.step == 2
    _assert_bitwise(got, want, engine.trainable_parameters(), ref.trainable_parameters())


def _moe_model() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         output_router_logits=True, tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_archon_two_steps_equal_the_reference_loop_bitwise(family):
    model = tiny("xs", seed=0)[0] if family == "dense" else _moe_model()
    batch = _batch(model.config.vocab_size)
    engine = ArchonEngine(copy.deepcopy(model), **ENGINE_KWARGS)
    got = [engine.train_step(batch, _loss) for _ in range(2)]

    ref = ArchonEngine(copy.deepcopy(model), **ENGINE_KWARGS)
    coef = ref.args.router_aux_loss_coef

    def clip() -> float:
        grads = [p.grad for p in ref.module.parameters() if p.grad is not None]
        return clip_grads(grads, ENGINE_KWARGS["max_grad_norm"], ref.device)

    def aux():
        return ref.model.aux_loss() * coef if family == "moe" else None

    want = _reference_steps(ref.module, ref.optimizer, ref.scheduler, clip, batch, 2, aux)
    assert ("aux_loss" in want[0]) == (family == "moe")
    assert want[0]["grad_norm"] > ENGINE_KWARGS["max_grad_norm"]
    assert engine.step == 2
    _assert_bitwise(got, want, engine.trainable_parameters(), ref.trainable_parameters())


# -- the planner, as pure functions ---------------------------------------------------------


def test_ranks_stride_over_rows_sorted_by_length():
    lengths = [5, 17, 3, 9, 11, 2]  # longest first: rows 1, 4, 3, 0, 2, 5
    assert rank_microbatches(lengths, 0, 2, token_budget=1000) == [[1, 3, 2]]
    assert rank_microbatches(lengths, 1, 2, token_budget=1000) == [[4, 0, 5]]
    assert rank_microbatches(lengths, 2, 3, token_budget=1000) == [[3, 5]]
    one_rank = rank_microbatches(lengths, 0, 1, token_budget=1000)
    assert one_rank == plan_microbatches(lengths, 1000) == [[1, 4, 3, 0, 2, 5]]
    every = sorted(i for r in range(4) for p in rank_microbatches(lengths, r, 4, 20) for i in p)
    assert every == list(range(6))  # each row trained on exactly one rank


def test_rank_microbatches_respect_the_token_budget():
    lengths = [5, 17, 3, 9, 11, 2]
    # rank 0 holds 17, 9, 3: 2 * 17 > 20 so 17 alone, then 9 and 3 (2 * 9 <= 20)
    assert rank_microbatches(lengths, 0, 2, token_budget=20) == [[1], [3, 2]]
    # a single row longer than the budget still gets a micro-batch of its own
    assert rank_microbatches([40, 4, 4], 0, 1, token_budget=10) == [[0], [1, 2]]
    for r in range(2):
        for plan in rank_microbatches(lengths, r, 2, token_budget=20):
            assert len(plan) == 1 or len(plan) * max(lengths[i] for i in plan) <= 20


def test_shorter_ranks_get_zero_weighted_fillers_up_to_the_common_count():
    lengths = [17, 9, 9, 3]  # rank 0: 17 | 9 (two micro-batches); rank 1: 9 + 3 (one)
    plans = [rank_microbatches(lengths, r, 2, token_budget=18) for r in range(2)]
    assert plans == [[[0], [2]], [[1, 3]]]
    count = max(len(p) for p in plans)  # what the all-reduce MAX gives every rank
    assert with_fillers(plans[0], count) == [MicroBatchSlot([0], 1.0), MicroBatchSlot([2], 1.0)]
    assert with_fillers(plans[1], count) == [MicroBatchSlot([1, 3], 1.0), MicroBatchSlot([0], 0.0)]
    assert with_fillers([], 3) == [MicroBatchSlot([0], 0.0)] * 3


def test_without_a_group_a_rank_without_rows_still_runs_one_filler():
    assert plan_rank_microbatches([7], 1, 2, 32) == [MicroBatchSlot([0], 0.0)]
    assert plan_rank_microbatches([7], 0, 2, 32) == [MicroBatchSlot([0], 1.0)]
    assert plan_rank_microbatches([5, 17, 3, 9], 0, 1, 20) == [
        MicroBatchSlot([1], 1.0), MicroBatchSlot([3, 0], 1.0), MicroBatchSlot([2], 1.0)]


def test_planner_errors():
    with pytest.raises(ValueError, match=r"needs at least one sequence \(got an empty batch\)"):
        plan_rank_microbatches([], 0, 1, 32)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\) \(got 2\)"):
        rank_microbatches([3], 2, 2, 32)
    with pytest.raises(ValueError, match="count=1 is smaller than the 2 micro-batches planned"):
        with_fillers([[0], [1]], 1)
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        rank_microbatches([3], 0, 1, 0)


# -- the accumulate / step seam, with a one-parameter fake model ----------------------------


def _fake_forward(w: torch.Tensor):
    """logprobs = w * token id on real tokens; entropy = 1 (a model with one parameter)."""
    def forward(mb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        lp = w * mb.input_ids.float() * mb.attention_mask
        return lp, torch.ones_like(lp)
    return forward


def _sum_loss(logprobs, entropy, mb):
    return (logprobs * mb.loss_weights).sum(), {"tokens": mb.attention_mask.sum()}


def _tiny_batch() -> TokenBatch:
    batch = collate([Sample([1, 2, 3], [0, 1, 1], [0.0] * 3, [0] * 3),
                     Sample([4, 5], [0, 1], [0.0] * 2, [0] * 2)])
    batch.loss_weights = batch.loss_mask.float()
    return batch


def test_accumulate_weights_slots_scales_gradients_and_adds_the_aux_term():
    batch = _tiny_batch()
    w = torch.zeros((), requires_grad=True)
    slots = [MicroBatchSlot([0], 1.0), MicroBatchSlot([1], 1.0), MicroBatchSlot([0], 0.0)]
    out = accumulate_microbatches(batch, slots, _fake_forward(w), _sum_loss, grad_scale=3.0,
                                  aux_loss=lambda: w * 0 + 0.25)
    # d loss / dw: row 0 -> 2 + 3, row 1 -> 5; the filler (row 0 again) adds nothing
    assert w.grad.item() == (5.0 + 5.0) * 3.0
    assert out == {"aux_loss": 0.5, "loss": 0.0, "tokens": 5.0}


def test_run_train_step_refuses_a_non_finite_loss_before_any_update():
    w = torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    clipped = []

    def nan_loss() -> dict[str, float]:
        (w * float("nan")).backward()
        return {"loss": float("nan")}

    with pytest.raises(TrainError, match="non-finite loss nan at step 7; check the batch/loss"):
        run_train_step(nan_loss, optimizer=optimizer, scheduler=scheduler,
                       clip_grad_norm=lambda: clipped.append(1) or 0.0, num_tokens=3, step=7)
    assert w.grad is None and w.item() == 1.0 and scheduler.last_epoch == 0 and not clipped

    def finite_loss() -> dict[str, float]:
        (2 * w).backward()
        return {"loss": 2.0}

    out = run_train_step(finite_loss, optimizer=optimizer, scheduler=scheduler,
                         clip_grad_norm=lambda: 2.0, num_tokens=3, step=7)
    assert out == {"loss": 2.0, "lr": 0.1, "grad_norm": 2.0, "num_tokens": 3.0, "skipped": 0.0}
    assert w.item() == pytest.approx(0.8) and w.grad is None


def test_lr_schedule_is_validated_once_for_every_backend():
    check_lr_schedule("constant", None)
    check_lr_schedule("cosine", 10)
    with pytest.raises(ConfigError, match=r"must be 'constant' or 'cosine' \(got 'linear'\)"):
        check_lr_schedule("linear", 10)
    for engine in (FSDPEngine, ArchonEngine):  # raised before any model is built
        with pytest.raises(ConfigError, match=r"lr_schedule='cosine' needs total_steps="):
            engine("no-such-model", lr_schedule="cosine")
