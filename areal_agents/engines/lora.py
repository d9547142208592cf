"""Several LoRA adapters of one served base model, mixed row by row in one batched forward.

``LoRAAdapters.install(model)`` turns the model's targeted ``nn.Linear`` layers into
``MultiLoRALinear`` (same class hierarchy, same parameter names, so full HF-named weight updates
keep working). Each layer holds, per adapter *slot*, ``A [r, in]`` and ``B [out, r]``; slot 0 is
"no adapter" (zeros). Before a forward, ``rows(names)`` says which adapter each batch row uses;
the layer then computes, per row ``b``::

    y[b] = W x[b] + bias + scaling[slot_b] * B[slot_b] @ A[slot_b] @ x[b]

(punica's gathered "BGMV" form: one gather and two batched matmuls, whatever the mix). Ranks may
differ between adapters: smaller ones are zero-padded to the largest, which changes nothing.

A new adapter starts with ``A = B = 0`` -- exactly the trainer's LoRA at initialisation
(``B = 0``), so the served adapter equals the base until the first update.

An ``nn.Embedding`` may be adapted too (``MultiLoRAEmbedding``, e.g. ``embed_tokens``): as in
PEFT, ``A [r, num_embeddings]`` and ``B [dim, r]``, and a token ``t`` of row ``b`` gets
``W[t] + scaling * B @ A[:, t]`` -- the linear form applied to a one-hot input.

Adapter tensors are loaded under PEFT names (``base_model.model.<module>.lora_A.weight``, as
``FSDPEngine``/``ArchonEngine`` ``export_weights(merge_lora=False)`` yield them; an embedding's
``<module>.lora_embedding_A``), or under ``<module>.lora_A.weight``; an optional adapter name
infix (``lora_A.default.weight``, ``lora_embedding_A.default``) is accepted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["AdapterSpec", "LoRAAdapters", "MultiLoRAEmbedding", "MultiLoRALinear",
           "parse_adapter_name"]

_PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])"
                        r"(?:\.[^.]+)?\.weight$")
_PEFT_EMBEDDING_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)"
                                  r"\.lora_embedding_(?P<kind>[AB])(?:\.[^.]+)?$")


def parse_adapter_name(name: str) -> tuple[str, str]:
    """``(module, "A" | "B")`` of a PEFT-style adapter tensor name.

    Example:
        >>> parse_adapter_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        ('model.layers.0.self_attn.q_proj', 'A')
        >>> parse_adapter_name("base_model.model.model.embed_tokens.lora_embedding_B.default")
        ('model.embed_tokens', 'B')

    Raises:
        KeyError: not an adapter tensor name.
    """
    match = _PEFT_NAME.match(name) or _PEFT_EMBEDDING_NAME.match(name)
    if match is None:
        raise KeyError(f"{name!r} is not a LoRA adapter tensor name "
                       "(expected '<module>.lora_A.weight' or '<module>.lora_B.weight')")
    return match["module"], match["kind"]


@dataclass
class AdapterSpec:
    """One adapter's shape: rank, ``alpha`` (``scaling = alpha / rank``) and the ``fnmatch``
    patterns of the linear (and embedding) layers it adapts (matched against the full module
    name or its last part, e.g. ``q_proj``, ``embed_tokens``)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                               "o_proj"])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1 (got {self.rank})")
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty; name at least one linear layer")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def matches(self, name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p)
                   for p in self.target_modules)


class _Rows:
    """The slot of each batch row in the forward in progress (``None``: every row is base)."""

    index: torch.Tensor | None = None


class _SlotAdapters:
    """Per-slot ``A [r, in]`` / ``B [out, r]`` of one adapted layer (plain attributes, not
    parameters or buffers: the layer's ``state_dict`` stays the base model's)."""

    lora_a: list[torch.Tensor]  # per slot [r_slot, in]
    lora_b: list[torch.Tensor]  # per slot [out, r_slot]
    lora_scaling: list[float]
    lora_rows: _Rows
    _stacks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    weight: torch.Tensor
    in_features: int
    out_features: int

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._stacks is None:
            rank = max(a.shape[0] for a in self.lora_a)
            a = torch.stack([F.pad(t, (0, 0, 0, rank - t.shape[0])) for t in self.lora_a])
            b = torch.stack([F.pad(t, (0, rank - t.shape[1])) for t in self.lora_b])
            scaling = torch.tensor(self.lora_scaling, dtype=a.dtype, device=a.device)
            self._stacks = (a, b, scaling)
        return self._stacks

    def set_slot(self, slot: int, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                 *, rank: int = 1, scaling: float = 0.0) -> None:
        """Create slot ``slot`` (zeros of ``rank``) or overwrite its ``a``/``b``."""
        w = self.weight
        while len(self.lora_a) <= slot:
            self.lora_a.append(w.new_zeros(rank, self.in_features))
            self.lora_b.append(w.new_zeros(self.out_features, rank))
            self.lora_scaling.append(scaling)
        if a is not None:
            self.lora_a[slot] = a.detach().to(device=w.device, dtype=w.dtype).clone()
        if b is not None:
            self.lora_b[slot] = b.detach().to(device=w.device, dtype=w.dtype).clone()
        self._stacks = None

    def _init_slots(self, rows: _Rows) -> None:
        w = self.weight
        self.lora_a = [w.new_zeros(1, self.in_features)]  # slot 0: no adapter
        self.lora_b = [w.new_zeros(self.out_features, 1)]
        self.lora_scaling = [0.0]
        self.lora_rows = rows
        self._stacks = None


class MultiLoRALinear(_SlotAdapters, nn.Linear):
    """``nn.Linear`` plus per-slot adapters chosen per batch row (made by ``LoRAAdapters``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        index = self.lora_rows.index
        if index is None:
            return out
        a, b, scaling = self._stacked()
        h = torch.einsum("bsi,bri->bsr", x, a.index_select(0, index))  # [batch, seq, r]
        delta = torch.einsum("bsr,bor->bso", h, b.index_select(0, index))  # [batch, seq, out]
        return out + delta * scaling.index_select(0, index)[:, None, None]


class MultiLoRAEmbedding(_SlotAdapters, nn.Embedding):
    """``nn.Embedding`` plus per-slot adapters chosen per batch row: row ``b``'s token ``t``
    gets ``W[t] + scaling * B @ A[:, t]`` (PEFT's embedding LoRA; ``in_features`` is the
    vocabulary, ``out_features`` the embedding width)."""

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.num_embeddings

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        index = self.lora_rows.index
        if index is None:
            return out
        a, b, scaling = self._stacked()
        a_rows = a.index_select(0, index).transpose(1, 2)  # [batch, vocab, r]
        h = torch.gather(a_rows, 1, x[..., None].expand(*x.shape, a_rows.shape[2]))  # [b, s, r]
        delta = torch.einsum("bsr,bor->bso", h, b.index_select(0, index))  # [batch, seq, out]
        return out + delta * scaling.index_select(0, index)[:, None, None]


_ADAPTABLE = (nn.Linear, nn.Embedding)


def _convert(module: nn.Linear | nn.Embedding, rows: _Rows) -> _SlotAdapters:
    module.__class__ = MultiLoRAEmbedding if isinstance(module, nn.Embedding) else MultiLoRALinear
    assert isinstance(module, _SlotAdapters)
    module._init_slots(rows)
    return module


class LoRAAdapters:
    """The named adapters installed in one served model.

    Example:
        >>> from areal_agents.models import tiny
        >>> model, _ = tiny("xs")
        >>> adapters = LoRAAdapters(model)
        >>> adapters.add("speaker", AdapterSpec(rank=2, target_modules=["q_proj"]))
        >>> adapters.names
        ['speaker']
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.specs: dict[str, AdapterSpec] = {}
        self._slots: dict[str, int] = {}
        self._rows = _Rows()
        self._layers: dict[str, _SlotAdapters] = {}

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def add(self, name: str, spec: AdapterSpec) -> None:
        """Add adapter ``name`` (zeros: equal to the base model).

        Raises:
            ConfigError: the name is taken, or ``spec.target_modules`` matches no linear or
                embedding layer.
        """
        if name in self.specs:
            raise ConfigError(f"adapter {name!r} already exists; adapters: {self.names}")
        targets = [(n, m) for n, m in self.model.named_modules()
                   if isinstance(m, _ADAPTABLE) and spec.matches(n)]
        if not targets:
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules()
                              if isinstance(m, _ADAPTABLE)})
            raise ConfigError(f"LoRA target_modules {spec.target_modules} match no linear layer "
                              f"or embedding of the served model; available: {linears}")
        slot = len(self._slots) + 1
        for module_name, module in targets:
            if module_name not in self._layers:
                self._layers[module_name] = _convert(module, self._rows)
        for module_name, layer in self._layers.items():
            adapted = spec.matches(module_name)
            layer.set_slot(slot, rank=spec.rank, scaling=spec.scaling if adapted else 0.0)
        self.specs[name] = spec
        self._slots[name] = slot

    def load(self, name: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Overwrite adapter ``name``'s ``A``/``B`` from PEFT-named tensors; returns the count.

        Every name and shape is checked before anything changes.

        Raises:
            KeyError: an unknown adapter, a non-adapter name, or a module this adapter does not
                adapt.
            ValueError: a shape that does not match the adapter's rank and the layer.
        """
        if name not in self.specs:
            raise KeyError(f"no adapter {name!r}; adapters: {self.names}")
        spec, slot = self.specs[name], self._slots[name]
        planned = []
        for tensor_name, tensor in tensors:
            module_name, kind = parse_adapter_name(tensor_name)
            layer = self._layers.get(module_name)
            if layer is None or not spec.matches(module_name):
                raise KeyError(f"adapter {name!r} has no LoRA layer {module_name!r} "
                               f"(its target_modules: {spec.target_modules})")
            expected = ((spec.rank, layer.in_features) if kind == "A"
                        else (layer.out_features, spec.rank))
            if tuple(tensor.shape) != expected:
                raise ValueError(f"adapter {name!r}: {tensor_name!r} has shape "
                                 f"{tuple(tensor.shape)}, expected {expected} (rank {spec.rank})")
            planned.append((layer, kind, tensor))
        for layer, kind, tensor in planned:
            layer.set_slot(slot, **{kind.lower(): tensor})
        return len(planned)

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Run the forward inside with row ``i`` using adapter ``names[i]`` (None: the base)."""
        slots = [0 if n is None else self._slots[n] for n in names]
        device = next(iter(self._layers.values())).weight.device if self._layers else None
        self._rows.index = (torch.tensor(slots, device=device) if any(slots) else None)
        try:
            yield
        finally:
            self._rows.index = None
