"""HF ⇄ Archon state-dict conversion and HF checkpoint directories (safetensors)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from .args import ModelArgs

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


_FUSED = {  # fused Archon module -> its parts, in row order
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}
_FUSED_RE = re.compile(r"^(layers\.\d+\.)(attention\.wqkv|feed_forward\.w13)\.(weight|bias)$")
_PART_RE = re.compile(r"^(layers\.\d+\.)(attention\.w[qkv]|feed_forward\.w[13])\.(weight|bias)$")


def unfuse_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Archon fused layout -> unfused: ``wqkv`` rows split into ``wq, wk, wv`` and ``w13`` into
    ``w1, w3`` (views, no copy), in the unfused module order; other entries pass through.
    Part sizes come from the fused tensor: q takes what k and v (equal widths) leave, so the
    caller needs no config."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _FUSED_RE.match(name)
        if m is None:
            out[name] = t
            if name in pending:
                out.update(pending.pop(name))  # w3 after w2: the unfused module order
            continue
        prefix, fused, kind = m.groups()
        parts = _FUSED[fused]
        if fused == "feed_forward.w13":
            w1, w3 = t.chunk(2, dim=0)
            out[f"{prefix}{parts[0]}.{kind}"] = w1
            pending[f"{prefix}feed_forward.w2.weight"] = {f"{prefix}{parts[1]}.{kind}": w3}
            continue
        out.update(zip((f"{prefix}{p}.{kind}" for p in parts), _split_qkv(t, state, prefix), strict=True))
    for rest in pending.values():  # w2 absent (e.g. a partial state dict)
        out.update(rest)
    return out


def _split_qkv(t: torch.Tensor, state: Mapping[str, torch.Tensor], prefix: str) -> tuple:
    """Rows of a fused ``wqkv`` tensor as ``(q, k, v)``; q's width is ``wo``'s input width."""
    wo = state.get(f"{prefix}attention.wo.weight")
    if wo is None:
        raise KeyError(f"splitting {prefix}attention.wqkv needs {prefix}attention.wo.weight (q width)")
    q = wo.shape[1]
    kv = (t.shape[0] - q) // 2
    return tuple(t.split([q, kv, kv], dim=0))


def fuse_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Archon unfused layout -> fused (``wq, wk, wv`` -> ``wqkv``; ``w1, w3`` -> ``w13``,
    concatenated along the output rows); other entries pass through in order.

    Raises:
        KeyError: a fused group is incomplete (e.g. ``wq`` without ``wk``).
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _PART_RE.match(name)
        if m is None:
            out[name] = t
            continue
        prefix, part, kind = m.groups()
        fused = next(f for f, parts in _FUSED.items() if part in parts)
        key = f"{prefix}{fused}.{kind}"
        if key not in groups:
            groups[key] = {}
            out[key] = None  # type: ignore[assignment]  # placeholder keeps the order
        groups[key][part] = t
    for key, parts in groups.items():
        fused = _FUSED_RE.match(key).group(2)
        missing = [p for p in _FUSED[fused] if p not in parts]
        if missing:
            raise KeyError(f"cannot fuse {key}: missing {missing}")
        out[key] = torch.cat([parts[p] for p in _FUSED[fused]], dim=0)
    return out


def archon_to_hf(state: Mapping[str, torch.Tensor], args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for an Archon state dict (experts split per expert as on disk;
    fused ``wqkv``/``w13`` split into HF's q/k/v and gate/up projections).

    The tied ``lm_head.weight`` is omitted when ``args.tie_embeddings``.

    Raises:
        KeyError: a key has no HF counterpart.
    """
    top = dict(_TOP_MAP)
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
            for e in range(t.shape[0]):
                yield f"model.layers.{layer}.mlp.experts.{e}.{_EXPERT[kind]}.weight", t[e]
            continue
        if rest not in _A2H:
            raise KeyError(f"no HF name for Archon parameter {name!r}")
        yield f"model.layers.{layer}.{_A2H[rest]}", t


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


def relayout(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """``model`` itself if its projections are already (un)fused as asked, else a new plain
    Archon model with the other layout and the same weights (same device and dtype)."""
    from dataclasses import replace

    from .qwen3 import Transformer

    if model.args.fused_projections == fused:
        return model
    state = model.state_dict()
    args = replace(model.args, fused_projections=fused)
    new = Transformer(args).to(next(model.parameters()).device)
    new.load_state_dict(fuse_state(state) if fused else unfuse_state(state), strict=True)
    return new


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
