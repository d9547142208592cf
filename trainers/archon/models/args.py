"""``ModelArgs``: the architecture of an Archon decoder, convertible to and from HF configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["qwen3", "qwen2", "llama", "qwen3_moe"]

_HF_ARCH = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


@dataclass
class ModelArgs:
    """Decoder hyper-parameters (one object for the dense and MoE families).

    Family switches: ``qk_norm`` (Qwen3 RMSNorm on q/k heads), ``qkv_bias`` (Qwen2 biases
    on q/k/v; ``o_bias`` for Llama/Qwen3 ``attention_bias``), ``rope_scaling`` (Llama-3 frequency scaling dict, HF ``rope_parameters``
    layout). MoE fields are used only when ``num_experts > 0``.
    """

    family: Family = "qwen3"
    vocab_size: int = 128
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    hidden_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    qk_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    # layout, not architecture: one wqkv / w13 matmul instead of wq,wk,wv / w1,w3 (HF
    # checkpoints are converted either way; TP and LoRA use the unfused layout)
    fused_projections: bool = True
    # MoE
    num_experts: int = 0
    top_k: int = 2
    moe_hidden_dim: int = 64
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer_id: int) -> bool:
        """Whether block ``layer_id`` uses the sparse MoE MLP (HF Qwen3-MoE rule)."""
        return (
            self.is_moe
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelArgs:
        """Build from a ``transformers`` config (Qwen3, Qwen2, Llama or Qwen3-MoE).

        Raises:
            ValueError: the config's ``model_type`` is not one of the supported families.
        """
        model_type = getattr(cfg, "model_type", "")
        if model_type not in _HF_ARCH:
            raise ValueError(
                f"Archon has no model for model_type={model_type!r}; supported: {sorted(_HF_ARCH)}"
            )
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        scaling = rope if rope.get("rope_type", "default") not in ("default", None) else None
        if scaling is not None and scaling.get("rope_type") != "llama3":
            raise ValueError(
                f"rope_type={scaling.get('rope_type')!r} is not supported by Archon; "
                "use default or llama3 RoPE"
            )
        args = cls(
            family=model_type,
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=cfg.max_position_embeddings,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(getattr(cfg, "attention_bias", False)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )
        if model_type == "llama" and getattr(cfg, "mlp_bias", False):
            raise ValueError("Llama configs with mlp_bias=True are not supported by Archon")
        if model_type == "qwen3_moe":
            args.num_experts = cfg.num_experts
            args.top_k = cfg.num_experts_per_tok
            args.moe_hidden_dim = cfg.moe_intermediate_size
            args.norm_topk_prob = bool(cfg.norm_topk_prob)
            args.router_aux_loss_coef = float(cfg.router_aux_loss_coef)
            args.decoder_sparse_step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
            args.mlp_only_layers = list(getattr(cfg, "mlp_only_layers", []) or [])
        return args

    def to_hf_config(self) -> Any:
        """The equivalent ``transformers`` config (for saving HF checkpoints)."""
        import transformers

        config_cls = getattr(transformers, _HF_ARCH[self.family][0])
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        kw: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.norm_eps,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters=rope,
        )
        if self.family in ("qwen3", "llama"):
            kw["attention_bias"] = self.qkv_bias
        if self.family == "qwen3_moe":
            kw.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.top_k,
                moe_intermediate_size=self.moe_hidden_dim,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.router_aux_loss_coef,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
            )
        cfg = config_cls(**kw)
        cfg.architectures = [_HF_ARCH[self.family][1]]
        return cfg
