"""Shared tiny HF models for the Archon tests (2 layers x 64 wide)."""

from __future__ import annotations

import torch


def hf_tiny(family: str = "qwen3", seed: int = 0, tie: bool = False, **overrides):
    """A random tiny ``transformers`` causal LM of ``family`` (float32, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    if family == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "llama":
        cfg = tf.LlamaConfig(head_dim=16, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **common)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, norm_topk_prob=True,
                                output_router_logits=True, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cls = getattr(tf, cfg.architectures[0] if cfg.architectures else "") if cfg.architectures else None
    cls = cls or {"qwen3": tf.Qwen3ForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
                  "llama": tf.LlamaForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM}[family]
    model = cls(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so parity covers them
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if n.endswith("norm.weight") else 0.0))
    return model


def make_batch(vocab: int = 96, lengths=(12, 9, 16, 5), seed: int = 0, temperature: float = 1.0):
    """A right-padded ``TokenBatch`` with loss weights = mask / masked-token count."""
    from areal_agents.samples import Sample, collate

    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)
        samples.append(Sample(ids, mask, [0.0] * n, [0] * n, reward=1.0))
    batch = collate(samples, temperature=temperature)
    batch.advantages = torch.randn(batch.input_ids.shape, generator=g)
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    return batch


def pg_loss(logprobs, entropy, mb):
    """A policy-gradient-style LossFn: ``-sum(A * logp * w)`` plus a small entropy bonus."""
    w = mb.loss_weights
    loss = -(mb.advantages * logprobs * w).sum() - 0.01 * (entropy * w).sum()
    return loss, {"entropy": (entropy * w).sum().detach()}


TINY_ARGS = dict(vocab_size=96, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, fn, kwargs):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(**kwargs)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads occasionally abort the process in
    # C++ static destructors ("terminate called without an active exception") after all work
    # is done and saved, which would fail an otherwise passing run.
    os._exit(0)


def run_distributed(fn, world: int, out_dir: str, **kwargs) -> list:
    """Run ``fn(**kwargs)`` on ``world`` gloo processes; returns each rank's return value."""
    import os

    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), out_dir, fn, kwargs), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def train_once(engine_kwargs: dict, model=None, steps: int = 1, lengths=(12, 9, 16, 5, 7, 14)) -> dict:
    """Build an ArchonEngine, take ``steps`` training steps, return stats, log-probs and the
    exported weights (HF names; only on rank 0 when distributed)."""
    from areal_agents.trainers.archon import ArchonEngine, ModelArgs

    engine_kwargs = dict(engine_kwargs)
    args = ModelArgs(**{**TINY_ARGS, **engine_kwargs.pop("model_args", {})})
    # eps=1e-6: Adam's first step divides by |g|, which would amplify reduction-order noise of
    # near-zero gradients; the larger eps keeps the comparison about the parallel maths
    engine = ArchonEngine(model if model is not None else args, lr=1e-2, eps=1e-6, seed=0, **engine_kwargs)
    batch = make_batch(vocab=args.vocab_size, lengths=lengths)
    stats = [engine.train_step(batch, pg_loss) for _ in range(steps)]
    logprobs = engine.forward_logprobs(batch)
    weights = dict(engine.export_weights())
    return {"stats": stats, "logprobs": logprobs, "weights": weights}


def assert_same_run(single: dict, dist_result: dict, atol: float = 2e-5) -> None:
    import pytest

    for s, d in zip(single["stats"], dist_result["stats"], strict=True):
        assert d["loss"] == pytest.approx(s["loss"], abs=atol)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
    assert (single["logprobs"] - dist_result["logprobs"]).abs().max() <= atol * 10
    assert set(single["weights"]) == set(dist_result["weights"])
    for name, t in single["weights"].items():
        assert (t - dist_result["weights"][name]).abs().max() <= atol, name


def train_moe_once(engine_kwargs: dict, steps: int = 1) -> dict:
    """``train_once`` for the tiny Qwen3-MoE (4 experts, top-2, no aux loss: the balancing
    loss depends on how tokens are split over ranks, the expert maths must not)."""
    hf = hf_tiny("qwen3_moe", router_aux_loss_coef=0.0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return train_once(engine_kwargs, model=hf, steps=steps)


def save_then_resume(engine_kwargs: dict, path: str) -> dict:
    """Train a step, save (DCP), resume in a differently initialised engine, train one more
    step in both; returns both second-step losses and the max weight difference."""
    from areal_agents.trainers.archon import ArchonEngine, ModelArgs

    args = ModelArgs(**TINY_ARGS)
    a = ArchonEngine(args, lr=1e-2, eps=1e-6, seed=0, **engine_kwargs)
    batch = make_batch(lengths=(12, 9, 16, 5, 7, 14))
    a.train_step(batch, pg_loss)
    a.save(path)
    b = ArchonEngine(args, lr=1e-2, eps=1e-6, seed=1, **engine_kwargs)
    b.load(path)
    la, lb = a.train_step(batch, pg_loss)["loss"], b.train_step(batch, pg_loss)["loss"]
    wa, wb = dict(a.export_weights()), dict(b.export_weights())
    diff = max(((wa[k] - wb[k]).abs().max().item() for k in wa), default=0.0)
    return {"losses": (la, lb), "diff": diff, "step": b.step, "n": len(wa)}


def train_grouped(engine_kwargs: dict, steps: int = 2) -> dict:
    """``train_once`` on the grouped batch of the shared-prompt tests (10 prompts x 4
    answers, ``fsdp._helpers.many_groups``), with the engine's sharing flag and saved tokens."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spawned ranks: tests/ too
    from fsdp._helpers import many_groups, ppo_loss

    from areal_agents.trainers.archon import ArchonEngine

    engine = ArchonEngine(hf_tiny("qwen3", seed=1), lr=1e-3, token_budget=80, **engine_kwargs)
    batch = many_groups()
    stats = [engine.train_step(batch, ppo_loss) for _ in range(steps)]
    return {"stats": stats, "logprobs": engine.forward_logprobs(batch),
            "weights": dict(engine.export_weights()), "shares": engine.share_prompts}
