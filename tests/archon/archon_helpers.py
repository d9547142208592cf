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
