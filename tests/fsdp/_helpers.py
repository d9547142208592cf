"""Shared helpers for the FSDP tests: a tiny seeded Qwen3 model, a batch, a PPO-style loss.

Module-level functions so spawned workers can unpickle them.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from areal_agents.samples import Sample, TokenBatch, collate

VOCAB = 96


def make_model(seed: int = 0, tie: bool = True) -> Qwen3ForCausalLM:
    """A 2-layer, 64-wide Qwen3 causal LM with deterministic weights."""
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # HF zero-inits some weights; make everything non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.float()


def make_batch(seed: int = 1, num: int = 6, temperature: float = 1.0) -> TokenBatch:
    """Sequences of varied length with a prompt part (mask 0) and a generated part (mask 1)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        n_prompt, n_gen = 3 + i % 3, 2 + (i * 5) % 7
        ids = torch.randint(1, VOCAB, (n_prompt + n_gen,), generator=g).tolist()
        lp = (-torch.rand(n_gen, generator=g) * 3 - 0.5).tolist()
        samples.append(Sample(ids, [0] * n_prompt + [1] * n_gen, [0.0] * n_prompt + lp,
                              [-1] * n_prompt + [0] * n_gen, reward=float(i % 2), group="g"))
    batch = collate(samples, temperature=temperature)
    adv = (batch.rewards - batch.rewards.mean())[:, None].expand_as(batch.loss_mask)
    batch.advantages = adv * batch.loss_mask
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    return batch


def ppo_loss(logprobs, entropy, mb, clip_eps: float = 0.2):
    """Token-level PPO clip loss with batch-global ``loss_weights`` (conforms to LossFn)."""
    ratio = torch.exp((logprobs - mb.old_logprobs) * mb.loss_mask)
    adv = mb.advantages
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = (per_token * mb.loss_weights).sum()
    return loss, {"entropy": (entropy * mb.loss_weights).sum().detach()}


def make_engine(seed: int = 0, **kwargs):
    from areal_agents.trainers.fsdp import FSDPEngine

    kwargs.setdefault("lr", 1e-3)
    return FSDPEngine(make_model(seed), **kwargs)


def train_and_export(ckpt_dir: str | None = None, steps: int = 1, **kwargs):
    """Worker: ``steps`` train steps on ``make_batch()``; returns (stats, exported weights)."""
    engine = make_engine(token_budget=24, **kwargs)
    batch = make_batch()
    stats = [engine.train_step(batch, ppo_loss) for _ in range(steps)]
    weights = dict(engine.export_weights())
    if ckpt_dir is not None:
        engine.save(ckpt_dir)
    logprobs = engine.forward_logprobs(batch)
    return stats, weights, logprobs


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def train_lora_and_export(steps: int = 2, lora: dict | None = None, tie: bool = True):
    """Worker: LoRA train steps (``lora``: default ``LORA``; ``tie``: tied embeddings);
    returns (losses, merged export, adapter export)."""
    from areal_agents.trainers.fsdp import FSDPEngine

    engine = FSDPEngine(make_model(0, tie=tie), token_budget=24, lora=lora or LORA, lr=1e-2)
    batch = make_batch()
    losses = [engine.train_step(batch, ppo_loss)["loss"] for _ in range(steps)]
    merged = {n: t.clone() for n, t in engine.export_weights()}
    adapter = {n: t.clone() for n, t in engine.export_weights(merge_lora=False)}
    return losses, merged, adapter


def read_shared_into_model(manifest):
    """Worker (another process): load shared-memory weights into a fresh model."""
    from areal_agents.trainers.weight_sync import read_shared

    model = make_model(seed=55)
    tensors = dict(read_shared(manifest))
    model.load_state_dict(tensors, strict=False)
    batch = make_batch()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    return sorted(tensors), logits


def nan_loss(logprobs, entropy, mb):
    """A LossFn whose loss is NaN (train_step must refuse it)."""
    return (logprobs * mb.loss_weights).sum() * float("nan"), {}


def rank_and_world(fail_on_rank: int = -1):
    """Worker: ``(rank, world size, torch threads)``; raises on ``fail_on_rank``."""
    import torch.distributed as dist

    if dist.get_rank() == fail_on_rank:
        raise ValueError(f"boom on rank {fail_on_rank}")
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads()


def train_uneven():
    """Worker: 3 sequences, budget 12 -> rank 0 runs 2 micro-batches, rank 1 one (+1 dummy)."""
    engine = make_engine(token_budget=12)
    batch = make_batch(num=3)
    stats = engine.train_step(batch, ppo_loss)
    return stats, {n: t.clone() for n, t in engine.export_weights()}


def many_groups(num_prompts: int = 10, answers: int = 4, seed: int = 5):
    """``num_prompts`` prompts (6-13 tokens) x ``answers`` answers (1-7 tokens), rows of a
    group interleaved with the other groups' (as a batch of episodes arrives)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (6 + p % 8,), generator=g).tolist()
               for p in range(num_prompts)]
    samples = []
    for k in range(answers):
        for p, prompt in enumerate(prompts):
            n = 1 + (3 * p + 5 * k) % 7
            answer = torch.randint(1, VOCAB, (n,), generator=g).tolist()
            lp = [-(0.5 + torch.rand(1, generator=g).item()) for _ in range(n)]
            samples.append(Sample(prompt + answer, [0] * len(prompt) + [1] * n,
                                  [0.0] * len(prompt) + lp, [-1] * len(prompt) + [0] * n,
                                  reward=float((p * k) % 3 == 1), group=f"g{p}"))
    batch = collate(samples)
    adv = (batch.rewards - batch.rewards.mean())[:, None].expand_as(batch.loss_mask)
    batch.advantages = adv * batch.loss_mask
    batch.loss_weights = batch.loss_mask / batch.loss_mask.sum()
    return batch


def train_many_groups(steps: int = 2, token_budget: int = 80, **kwargs):
    """Worker: ``steps`` train steps on ``many_groups()``; returns (stats, exported weights,
    log-probs after, whether the engine shared prompts, prompt tokens it saved)."""
    engine = make_engine(token_budget=token_budget, **kwargs)
    batch = many_groups()
    stats = [engine.train_step(batch, ppo_loss) for _ in range(steps)]
    weights = {n: t.clone() for n, t in engine.export_weights()}
    logprobs = engine.forward_logprobs(batch)
    return stats, weights, logprobs, engine.share_prompts, engine.shared_prompt_tokens
