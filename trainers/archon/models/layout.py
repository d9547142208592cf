"""Projection layouts of Archon state dicts: fused (``wqkv``, ``w13``) ⇄ unfused
(``wq, wk, wv``, ``w1, w3``), and ``relayout`` of a live model."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

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
