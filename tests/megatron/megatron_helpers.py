"""Shared pieces of the megatron tests: tiny HF models, a GRPO batch, spawned-worker functions.

Module-level functions so spawned workers can unpickle them. Nothing here imports megatron.
"""

from __future__ import annotations

import copy

import torch

from areal_agents.samples import Sample, TokenBatch, collate


def hf_model(family: str = "qwen3", seed: int = 0, tie: bool | None = None):
    """A random tiny float32 ``transformers`` causal LM with non-trivial norms and biases.

    ``"qwen3"`` is the tiny factory's ``tiny("xs")`` (tied, q/k norm); ``"qwen2"`` (QKV bias),
    ``"llama"`` and ``"llama3"`` (Llama-3.1 RoPE scaling) are 2-layer, 64-wide, untied unless
    ``tie``.
    """
    import transformers as tf

    if family == "qwen3":
        from areal_agents.models import tiny

        model, _ = tiny("xs", seed=seed, **({} if tie is None else {"tie_word_embeddings": tie}))
    else:
        common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=bool(tie), rms_norm_eps=1e-5)
        torch.manual_seed(seed)
        if family == "qwen2":
            model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
        elif family == "llama":
            model = tf.LlamaForCausalLM(tf.LlamaConfig(head_dim=16, **common))
        elif family == "llama3":  # Llama-3.1 RoPE scaling (the constants megatron supports)
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
            model = tf.LlamaForCausalLM(tf.LlamaConfig(head_dim=16, rope_parameters=rope, **common))
        else:
            raise ValueError(family)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make parity cover them
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in n or n.endswith("bias") else 0.02))
    return model.float().eval()


def samples(vocab: int, num: int = 8, seed: int = 1) -> list[Sample]:
    """``num`` sequences of varied length (prompt mask 0, completion mask 1) in 2 groups."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        n_prompt, n_gen = 3 + i % 3, 2 + (i * 5) % 7
        ids = torch.randint(1, vocab, (n_prompt + n_gen,), generator=g).tolist()
        out.append(Sample(ids, [0] * n_prompt + [1] * n_gen, [0.0] * (n_prompt + n_gen),
                          [-1] * n_prompt + [0] * n_gen, reward=float((i * 7) % 3),
                          group=f"g{i % 2}"))
    return out


def grpo_batch(model, num: int = 8, temperature: float = 1.0) -> TokenBatch:
    """A GRPO-prepared batch whose behaviour log-probs are ``model``'s own (ratio 1)."""
    from areal_agents.algorithms import GRPO
    from areal_agents.trainers.logprobs import full_logprobs

    s = samples(model.config.vocab_size, num)
    batch = collate(s, temperature=temperature)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    old, _ = full_logprobs(logits, batch.input_ids, batch.attention_mask, temperature)
    batch.old_logprobs = old * batch.loss_mask
    return GRPO().prepare(batch, s)


def dp_cases():
    """Worker: DP runs with uneven micro-batch counts per rank, and with a rank without rows."""
    return [train_megatron(1, 2, None, "qwen3", 5, 12), train_megatron(1, 1, None, "qwen3", 1)]


def grpo_loss(logprobs, entropy, mb):
    """The shared GRPO loss (module-level, so workers can unpickle it)."""
    from areal_agents.algorithms import GRPO

    return GRPO().loss(logprobs, entropy, mb)


def train_megatron(tensor_parallel: int = 1, steps: int = 2, ckpt: str | None = None,
                   family: str = "qwen3", num: int = 8, token_budget: int = 24):
    """Worker: ``steps`` GRPO steps on ``num`` sequences; returns (stats per step, HF export,
    log-probs after)."""
    from areal_agents.trainers.megatron import MegatronEngine

    model = hf_model(family)
    batch = grpo_batch(model, num)
    engine = MegatronEngine(copy.deepcopy(model), lr=1e-3, token_budget=token_budget,
                            tensor_parallel=tensor_parallel)
    stats = [engine.train_step(batch, grpo_loss) for _ in range(steps)]
    weights = {n: t.clone() for n, t in engine.export_weights()}
    if ckpt is not None:
        engine.save(ckpt)
    return stats, weights, engine.forward_logprobs(batch)


def vocab_parallel_case(vocab: int = 95, padded: int = 96, temperature: float = 0.7,
                        sampling: tuple | None = None):
    """Worker: vocab-parallel log-probs of a fixed random case on this rank's weight rows.

    ``sampling``: ``(temperature, top_k, top_p)`` lists, one entry per sequence, instead of
    ``temperature``. Returns ``(logp, entropy, grad_hidden, grad_weight_rows)`` after
    backpropagating ``sum(a * logp) + sum(b * entropy)``; also runs single-process (one rank,
    all rows).
    """
    import torch.distributed as dist

    from areal_agents.trainers.megatron.vocab_parallel import vocab_parallel_sequence_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)
    weight = torch.randn(padded, 16, generator=g)
    weight[vocab:] = 0  # TP padding rows
    ids = torch.randint(0, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    a, b = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = padded // size
    hidden.requires_grad_(True)
    shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    group = dist.group.WORLD if dist.is_initialized() else None
    if sampling is not None:
        from areal_agents.trainers.logprobs import RowSampling

        temperature = RowSampling(*(torch.tensor(x) for x in sampling))
    lp, ent = vocab_parallel_sequence_logprobs(hidden, shard, ids, mask, temperature, 4,
                                               rank * rows, vocab, group)
    ((a * lp).sum() + (b * ent).sum()).backward()
    return lp.detach(), ent.detach(), hidden.grad, shard.grad


def make_engine(tensor_parallel: int = 1, family: str = "qwen3"):
    """A MegatronEngine on ``hf_model(family)`` (factory for ``DistributedEngineGroup``)."""
    from areal_agents.trainers.megatron import MegatronEngine

    return MegatronEngine(hf_model(family), lr=1e-3, token_budget=24, tensor_parallel=tensor_parallel)
