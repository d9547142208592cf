"""The running batch of a continuously batched engine: left-padded KV cache rows that join and leave.

``prefill`` computes whole prompts; ``prefill_cached`` computes a prompt's suffix after keys and
values reused from ``PrefixCache`` (``areal_agents.engines.prefix_cache``).

Row ``i`` of the batch is one completion being decoded. Its cached keys/values sit right-aligned
in ``[batch, kv_heads, length, head_dim]`` tensors (left padding, masked out by
``attention_mask``); ``positions[i]`` is the position id of the token it feeds next.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .lean_decode import decode_layers


@functools.cache
def _cache_arg(model_type: type) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# transformers causal LMs whose forward is exactly embed_tokens -> rotary_emb -> decoder layers
# -> norm -> lm_head (no embedding or logit scaling, no soft-capping); each is pinned bit for
# bit against the model's own forward in tests/engines/test_lean_decode.py
_LEAN_DECODE_MODELS = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


@functools.cache
def _lean_decode_type(model_type: type, layer_type: type) -> bool:
    """The static half of ``_lean_decode``: an allow-listed transformers class whose decoder
    layers take ``cache=``."""
    return (model_type.__name__ in _LEAN_DECODE_MODELS
            and model_type.__module__.startswith("transformers.models.")
            and "cache" in inspect.signature(layer_type.forward).parameters)


def _lean_decode(model: torch.nn.Module) -> bool:
    """Whether ``RunningBatch.decode`` may call ``model``'s modules itself (``_lean_forward``)
    instead of ``model(...)``: an allow-listed class (``_LEAN_DECODE_MODELS``) with nothing
    that the skipped wrappers would run: no hooks on the model or its base model (accelerate's
    ``_hf_hook`` included), no global module hooks, no instance-level ``forward`` override."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or not layers or not _lean_decode_type(type(model), type(layers[0])):
        return False
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "_hf_hook" in vars(m)
                   or "forward" in vars(m) for m in (model, base))


def _lean_forward(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None,
                  position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """``model(input_ids, attention_mask=mask, position_ids, cache, use_cache=True).logits``
    for a model ``_lean_decode`` accepts: the same module calls with the same arguments, so
    the same bits, without the wrappers around them (config defaults, output capturing, mask
    building, output objects), which cost about 0.3-0.4 ms of a tiny model's 3-8 ms decode
    step on a CPU. The decoder layers run through ``lean_decode.decode_layers`` (each layer's
    forward inline, the same ops, where nothing calls for the layer's own forward). ``mask``
    is the 4-D mask (or None) that the model's own mask building would return unchanged (see
    ``RunningBatch.decode``); every layer is full attention (``LocalEngine`` refuses sliding
    windows)."""
    base = model.model
    hidden = base.embed_tokens(input_ids)
    position_embeddings = base.rotary_emb(hidden, position_ids)
    hidden = decode_layers(model, hidden, mask, position_ids, position_embeddings, cache)
    return model.lm_head(base.norm(hidden))


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad dim -2 of a ``[batch, heads, seq, dim]`` tensor with zeros to ``length``."""
    missing = length - t.shape[-2]
    if missing == 0:
        return t
    pad = t.new_zeros(*t.shape[:-2], missing, t.shape[-1])
    return torch.cat([pad, t], dim=-2)


class BufferedLayer(DynamicLayer):
    """A cache layer whose keys/values are views of buffers with spare rows and columns.

    The live keys are ``buffer[:batch, :, start : start + length]``. Appending a decode step
    writes in place instead of ``torch.cat``-ing the whole cache (which copied every cached
    token at every step); rows that leave (``keep``) are closed up by moving only the rows
    after them, and rows that join (``append_rows``) are written into spare rows, so neither
    copies the whole cache twice (an ``index_select`` / ``cat`` and then a new buffer).
    The values in the live view are the same as a plain ``cat``/``index_select`` would give,
    padding included (zeros), so a forward pass over them computes the same bits. The buffers
    are inference tensors once a forward pass regrew them, so ``keep`` and ``append_rows``
    run in inference mode.

    Args:
        keys, values: ``[batch, heads, length, dim]`` initial contents (copied).
        rows: rows to make room for (at least ``batch``), so joining rows need no new buffer.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int = 0) -> None:
        super().__init__()
        self.set(keys, values, rows=rows)

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64, rows: int = 0) -> None:
        """Replace the contents with ``[batch, heads, length, dim]`` keys/values (copied) in new
        buffers of ``max(batch, rows)`` rows and ``length + spare`` columns."""
        batch, length = keys.shape[0], keys.shape[-2]
        shape = (max(batch, rows), keys.shape[1], length + spare, keys.shape[-1])
        self._key_buf = keys.new_empty(shape)
        self._value_buf = values.new_empty(*shape[:-1], values.shape[-1])
        self._key_buf[:batch, :, :length] = keys
        self._value_buf[:batch, :, :length] = values
        self._view(batch, 0, length)
        self.device = keys.device
        self.is_initialized = True

    def _view(self, batch: int, start: int, length: int) -> None:
        self._start = start
        self.keys = self._key_buf[:batch, :, start : start + length]
        self.values = self._value_buf[:batch, :, start : start + length]

    @property
    def row_capacity(self) -> int:
        return self._key_buf.shape[0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, new = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        if self._start + length + new > self._key_buf.shape[-2]:
            # room for this update too: a cached prefix's suffix can be longer than 64 tokens
            self.set(self.keys, self.values, spare=max(64, length, new), rows=self.row_capacity)
        self._view(batch, self._start, length + new)
        self.keys[:, :, length:] = key_states  # the new columns, written through the views
        self.values[:, :, length:] = value_states
        return self.keys, self.values

    @torch.inference_mode()
    def keep(self, rows: list[int], start: int) -> None:
        """Keep only batch rows ``rows`` (in that order) and the columns from ``start`` on.

        Strictly ascending ``rows`` (what leaving rows give) are closed up in place: row
        ``rows[i]`` moves to row ``i`` (a no-op where they are equal), never over a row still to
        be read. Any other order is gathered into new buffers.
        """
        length = self.keys.shape[-2]
        if any(b <= a for a, b in itertools.pairwise(rows)):
            index = torch.tensor(rows, device=self.keys.device)
            self.set(self.keys.index_select(0, index)[..., start:, :],
                     self.values.index_select(0, index)[..., start:, :], rows=self.row_capacity)
            return
        lo, hi = self._start + start, self._start + length
        for i, row in enumerate(rows):
            if row != i:
                self._key_buf[i, :, lo:hi] = self._key_buf[row, :, lo:hi]
                self._value_buf[i, :, lo:hi] = self._value_buf[row, :, lo:hi]
        self._view(len(rows), lo, length - start)

    @torch.inference_mode()
    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``[rows, heads, length, dim]`` rows after the current ones; the shorter side is
        left-padded with zeros to the longer length (as ``torch.cat`` of ``_left_pad``-ed
        tensors would be). In place when the spare rows and the columns before ``start``
        suffice; otherwise in new buffers."""
        batch, length = self.keys.shape[0], self.keys.shape[-2]
        rows, theirs = keys.shape[0], keys.shape[-2]
        width = max(length, theirs)
        grow = width - length  # columns the current rows gain on the left
        if batch + rows > self.row_capacity or grow > self._start:
            self.set(torch.cat([_left_pad(self.keys, width), _left_pad(keys, width)]),
                     torch.cat([_left_pad(self.values, width), _left_pad(values, width)]),
                     rows=max(self.row_capacity, batch + rows))
            return
        lo, hi = self._start - grow, self._start + length
        for buf, new in ((self._key_buf, keys), (self._value_buf, values)):
            if grow:
                buf[:batch, :, lo : self._start] = 0
            if theirs < width:
                buf[batch : batch + rows, :, lo : hi - theirs] = 0
            buf[batch : batch + rows, :, hi - theirs : hi] = new
        self._view(batch + rows, lo, width)


class RunningBatch:
    """KV cache, attention mask and position ids of the rows being decoded.

    Args:
        rows: the most rows expected at once (``LocalEngine.max_batch_size``): the cache
            buffers keep room for them, so joining rows are written in place.

    Attributes:
        cache: a ``DynamicCache`` whose layers (``BufferedLayer``) hold
            ``[batch, kv_heads, length, head_dim]``.
        mask: ``[batch, length]`` long, 1 where a cached position is real.
        positions: ``[batch]`` the position id of each row's next input token.
    """

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self._padded = False  # some row has padding (the mask has a 0); decode keeps it so

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @torch.inference_mode()
    def add(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Append rows (``mask``: ``[rows, len]``) whose KV are in ``cache``; pads to a common length."""
        if self.cache is None:
            cache.layers = [BufferedLayer(layer.keys, layer.values, rows=self.rows)
                            for layer in cache.layers]
            self.cache, self.mask, self.positions = cache, mask, positions
        else:
            length = max(self.length, mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.append_rows(theirs.keys, theirs.values)
            pad = lambda m: torch.nn.functional.pad(m, (length - m.shape[1], 0))  # noqa: E731
            self.mask = torch.cat([pad(self.mask), pad(mask)])
            self.positions = torch.cat([self.positions, positions])
        self._padded = not bool(self.mask.all())

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order) and drop columns that no kept row uses."""
        if not rows:
            self.cache = self.mask = self.positions = None
            self._padded = False
            return
        assert self.cache is not None and self.mask is not None and self.positions is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in self.cache.layers:
            layer.keep(rows, start)
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self._padded = not bool(self.mask.all())

    def row_kv(self, row: int, length: int | None = None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of row ``row``'s real (unpadded) keys and values, per layer
        ``[1, kv_heads, length, head_dim]`` (its cached positions are the last ``length``).
        ``length``: the row's real positions when the caller knows them (the engine: prompt +
        fed tokens), which spares summing its mask; None counts them."""
        assert self.cache is not None and self.mask is not None
        if length is None:
            length = int(self.mask[row].sum())
        keys = [layer.keys[row : row + 1, :, -length:, :].clone() for layer in self.cache.layers]
        values = [layer.values[row : row + 1, :, -length:, :].clone()
                  for layer in self.cache.layers]
        return keys, values

    def rows_kv(self, rows: list[int], length: int
                ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """``row_kv(row, length)`` of each of ``rows``, all of real length ``length``, copied
        together: one ``index_select`` per layer for the keys and one for the values, and
        row ``i``'s tensors are its ``[1, kv_heads, length, head_dim]`` slices of those
        copies (the same values; together they hold the group's copy, no more, until the
        last of them is dropped). One row is ``row_kv``'s copy."""
        assert self.cache is not None and self.mask is not None
        if len(rows) == 1:
            return [self.row_kv(rows[0], length)]
        index = torch.tensor(rows, device=self.mask.device)
        keys = [layer.keys[:, :, -length:, :].index_select(0, index)
                for layer in self.cache.layers]
        values = [layer.values[:, :, -length:, :].index_select(0, index)
                  for layer in self.cache.layers]
        return [([k[i : i + 1] for k in keys], [v[i : i + 1] for v in values])
                for i in range(len(rows))]

    @torch.inference_mode()
    def decode(self, model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
        """Feed one token per row; returns ``[batch, vocab]`` next-token logits.

        The attention mask goes in as the 4-D boolean mask the model would build from the 2-D
        one (``[batch, 1, 1, length]``, True where real: with one query token every cached
        position is causal), or None when no row is padded (as the model does then), so the
        model skips its own mask construction and computes the same bits. Models that
        ``_lean_decode`` accepts are run module by module (``_lean_forward``, the same bits).
        """
        assert self.cache is not None and self.mask is not None and self.positions is not None
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        input_ids_t = torch.tensor(input_ids, device=device)[:, None]
        mask = self.mask.bool()[:, None, None, :] if self._padded else None
        if _lean_decode(model):
            logits = _lean_forward(model, input_ids_t, mask, self.positions[:, None], self.cache)
        else:
            logits = model(input_ids=input_ids_t, attention_mask=mask,
                           position_ids=self.positions[:, None], use_cache=True,
                           **{_cache_arg(type(model)): self.cache}).logits
        self.positions = self.positions + 1
        return logits[:, -1, :].float()


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompts: list[list[int]], copies: list[int],
            device: torch.device) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``prompts`` through ``model`` in one left-padded batch; repeat row i ``copies[i]`` times.

    Returns:
        (cache, mask ``[rows, width]``, positions ``[rows]``, last-token logits
        ``[rows, vocab]``) with ``rows = sum(copies)``, ordered prompt by prompt.
    """
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = any(len(p) < width for p in prompts)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids,
        attention_mask=mask if padded else None,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
        **{_cache_arg(type(model)): cache},
    )
    index = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                    torch.tensor(copies, device=device))
    if len(index) != len(prompts) or padded:
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    logits = out.logits[:, -1, :].float().index_select(0, index)
    return cache, mask.index_select(0, index), lengths.index_select(0, index), logits


@torch.inference_mode()
def prefill_cached(model: torch.nn.Module, prefixes: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
                   suffixes: list[list[int]], copies: list[int],
                   device: torch.device) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run each of ``suffixes`` (all of one length) after its cached prefix, in one batch.

    Row ``i``'s prefix is per-layer ``(keys, values)`` of ``[1, kv_heads, p_i, head_dim]`` at
    positions ``0..p_i-1`` (``p_i`` may be 0); prefixes are left-padded to the longest, so
    every row is ``[padding | prefix | suffix]``, contiguous as ``RunningBatch`` expects.

    Returns:
        as ``prefill``: (cache, mask ``[rows, width]``, positions ``[rows]``, last-token
        logits ``[rows, vocab]``) with ``rows = sum(copies)``, ordered prompt by prompt.
    """
    width = len(suffixes[0])
    if any(len(s) != width for s in suffixes):
        raise ValueError("prefill_cached: every suffix must have the same length")
    lengths = torch.tensor([keys[0].shape[-2] for keys, _ in prefixes], device=device)
    past = int(lengths.max())
    cache = DynamicCache(config=model.config)
    cache.layers = [
        BufferedLayer(torch.cat([_left_pad(keys[layer], past) for keys, _ in prefixes]),
                      torch.cat([_left_pad(values[layer], past) for _, values in prefixes]))
        for layer in range(len(prefixes[0][0]))
    ]
    columns = torch.arange(past, device=device)
    mask = torch.cat([(columns[None, :] >= past - lengths[:, None]).long(),
                      torch.ones(len(prefixes), width, dtype=torch.long, device=device)], dim=1)
    out = model(
        input_ids=torch.tensor(suffixes, device=device),
        attention_mask=mask,
        position_ids=lengths[:, None] + torch.arange(width, device=device)[None, :],
        use_cache=True,
        logits_to_keep=1,
        **{_cache_arg(type(model)): cache},
    )
    index = torch.repeat_interleave(torch.arange(len(prefixes), device=device),
                                    torch.tensor(copies, device=device))
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    logits = out.logits[:, -1, :].float().index_select(0, index)
    return cache, mask.index_select(0, index), (lengths + width).index_select(0, index), logits
