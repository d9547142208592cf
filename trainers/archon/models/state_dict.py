"""HF ⇄ Archon state-dict conversion and HF checkpoint directories (safetensors).

Qwen3-MoE experts have two HF layouts (``ExpertLayout``):

* ``"per_expert"``: ``mlp.experts.{e}.{gate,up,down}_proj.weight``, one tensor per expert. The
  layout of published checkpoints, of vLLM's and SGLang's weight loaders, and of
  ``transformers`` < 5 in memory. ``save_hf_checkpoint`` / ``to_hf_state_dict`` write it
  (``transformers`` >= 5 converts it to its fused layout when loading).
* ``"fused"``: ``mlp.experts.gate_up_proj [E, 2I, D]`` (gate rows, then up rows) and
  ``mlp.experts.down_proj [E, D, I]``: ``transformers`` >= 5's in-memory ``state_dict`` names,
  hence what an in-process push into a served ``transformers`` model must use
  (``serving_expert_layout()``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import torch

from .args import ModelArgs
from .layout import fuse_state, relayout, unfuse_state

__all__ = ["ExpertLayout", "archon_to_hf", "from_hf", "fuse_state", "hf_to_archon",
           "load_hf_checkpoint", "read_hf_state_dict", "relayout", "save_hf_checkpoint",
           "serving_expert_layout", "to_hf_state_dict", "unfuse_state"]

ExpertLayout = Literal["fused", "per_expert"]

# (archon regex, HF template) for everything that maps one-to-one; {0} is the layer index.
_LAYER_MAP = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wq.bias", "self_attn.q_proj.bias"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wk.bias", "self_attn.k_proj.bias"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wv.bias", "self_attn.v_proj.bias"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention.wo.bias", "self_attn.o_proj.bias"),
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.router.weight", "mlp.gate.weight"),
]
_TOP_MAP = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_A2H = dict(_LAYER_MAP)
_H2A = {h: a for a, h in _LAYER_MAP}
_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")


def serving_expert_layout() -> ExpertLayout:
    """The MoE expert layout of the installed ``transformers``' in-memory models: ``"fused"``
    from version 5 (``Qwen3MoeExperts``), ``"per_expert"`` before (a ``ModuleList`` of MLPs)."""
    import transformers

    return "fused" if int(transformers.__version__.split(".")[0]) >= 5 else "per_expert"


def archon_to_hf(state: Mapping[str, torch.Tensor], args: ModelArgs,
                 experts: ExpertLayout = "per_expert") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for an Archon state dict (fused ``wqkv``/``w13`` split into
    HF's q/k/v and gate/up projections; MoE experts in the ``experts`` layout, see the module
    docstring: per expert as on disk, or fused as ``transformers`` >= 5 holds them).

    The tied ``lm_head.weight`` is omitted when ``args.tie_embeddings``.

    Raises:
        KeyError: a key has no HF counterpart.
        ValueError: an unknown ``experts`` layout.
    """
    if experts not in ("fused", "per_expert"):
        raise ValueError(f"experts={experts!r}; choose 'fused' or 'per_expert'")
    top = dict(_TOP_MAP)
    gate_or_up: dict[str, dict[str, torch.Tensor]] = {}  # fused: w1/w3 wait for each other
    for name, t in unfuse_state(state).items():
        if name in top:
            if name == "output.weight" and args.tie_embeddings:
                continue
            yield top[name], t
            continue
        m = _LAYER_RE.match(name)
        if m is None:
            raise KeyError(f"no HF name for Archon parameter {name!r}")
        layer, rest = m.groups()
        if rest.startswith("feed_forward.experts."):
            kind = rest.split(".")[2]
            prefix = f"model.layers.{layer}.mlp.experts"
            if experts == "per_expert":
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.{_EXPERT[kind]}.weight", t[e]
            elif kind == "w2":
                yield f"{prefix}.down_proj", t  # [E, D, I]
            else:
                pair = gate_or_up.setdefault(layer, {})
                pair[kind] = t
                if len(pair) == 2:
                    yield f"{prefix}.gate_up_proj", torch.cat([pair["w1"], pair["w3"]], dim=1)
                    del gate_or_up[layer]
            continue
        if rest not in _A2H:
            raise KeyError(f"no HF name for Archon parameter {name!r}")
        yield f"model.layers.{layer}.{_A2H[rest]}", t
    if gate_or_up:
        raise KeyError(f"MoE layers {sorted(gate_or_up)} have only one of experts.w1/w3; "
                       "the fused gate_up_proj needs both")


def hf_to_archon(state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Convert a HF state dict (on-disk per-expert or in-memory fused experts) to Archon names.

    Raises:
        KeyError: a key has no Archon counterpart.
    """
    top = {h: a for a, h in _TOP_MAP}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        m = _HF_LAYER_RE.match(name)
        if m is None:
            raise KeyError(f"no Archon name for HF parameter {name!r}")
        layer, rest = m.groups()
        if e := _HF_EXPERT_RE.match(rest):
            kind = {v: k for k, v in _EXPERT.items()}[e.group(2)]
            experts.setdefault((layer, kind), {})[int(e.group(1))] = t
        elif rest == "mlp.experts.gate_up_proj":  # transformers>=5 fused in-memory layout
            gate, up = t.chunk(2, dim=1)
            out[f"layers.{layer}.feed_forward.experts.w1"] = gate
            out[f"layers.{layer}.feed_forward.experts.w3"] = up
        elif rest == "mlp.experts.down_proj":
            out[f"layers.{layer}.feed_forward.experts.w2"] = t
        elif rest in _H2A:
            out[f"layers.{layer}.{_H2A[rest]}"] = t
        else:
            raise KeyError(f"no Archon name for HF parameter {name!r}")
    for (layer, kind), per in experts.items():
        out[f"layers.{layer}.feed_forward.experts.{kind}"] = torch.stack([per[i] for i in sorted(per)])
    if args.tie_embeddings or "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return fuse_state(out) if args.fused_projections else out


def read_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a HF checkpoint directory (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``).

    Raises:
        FileNotFoundError: neither file exists in ``path``.
    """
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path!r} has no model.safetensors or model.safetensors.index.json; "
            "pass a Hugging Face checkpoint directory saved with safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    for fname in files:
        state.update(load_file(os.path.join(path, fname)))
    return state


def load_hf_checkpoint(model: torch.nn.Module, path: str, strict: bool = True) -> None:
    """Load a HF checkpoint directory into an Archon ``model`` (plain, unsharded)."""
    state = hf_to_archon(read_hf_state_dict(path), model.args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint {path!r} does not match the model: missing={missing}, unexpected={unexpected}")


def save_hf_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    args: ModelArgs,
    path: str,
    max_shard_bytes: int | None = None,
) -> None:
    """Write HF-named tensors plus ``config.json`` as a directory ``transformers`` loads.

    With ``max_shard_bytes`` the weights are split into ``model-0000k-of-0000n.safetensors``
    files with an index, as ``save_pretrained`` does.
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous().clone()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    args.to_hf_config().save_pretrained(path)


def from_hf(source: str | torch.nn.Module, fused: bool = True) -> torch.nn.Module:
    """An Archon ``Transformer`` built from a HF checkpoint directory or a live HF model
    (``fused``: one ``wqkv``/``w13`` matmul per block; ``False`` for the TP/LoRA layout).

    Raises:
        ValueError: the architecture is not an Archon family.
    """
    from .qwen3 import Transformer

    if isinstance(source, str):
        from transformers import AutoConfig

        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"{source!r} is not a directory; pass a local HF checkpoint directory "
                "(config.json + model.safetensors), Archon never downloads from the hub"
            )
        args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(source))
        args.fused_projections = fused
        state = hf_to_archon(read_hf_state_dict(source), args)
    else:
        args = ModelArgs.from_hf_config(source.config)
        args.fused_projections = fused
        state = hf_to_archon(source.state_dict(), args)
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    return model


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF-named (on-disk layout) state dict of a plain Archon model."""
    return dict(archon_to_hf(model.state_dict(), model.args))
