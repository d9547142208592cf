"""``RunningBatch`` keeps its KV cache in buffers with spare rows and columns (rows that leave
are closed up in place, rows that join are written into spare rows) and hands the model a
ready 4-D attention mask. Pinned bit for bit against the previous storage (``torch.cat`` /
``index_select`` into a new buffer at every join and leave, the model's own mask building),
kept here as ``_CatBatch``: tokens, log-probs, top log-probs, versions, finish reasons."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines import local as local_mod
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.scheduler import BufferedLayer, RunningBatch, _cache_arg, _left_pad
from areal_agents.models import tiny


class _CatLayer(BufferedLayer):
    """The previous layer: a fresh buffer (64 spare columns) on every ``set``."""

    def set(self, keys, values, spare=64, rows=0):
        length = keys.shape[-2]
        self._key_buf = keys.new_empty(*keys.shape[:-2], length + spare, keys.shape[-1])
        self._value_buf = values.new_empty(*values.shape[:-2], length + spare, values.shape[-1])
        self._key_buf[..., :length, :] = keys
        self._value_buf[..., :length, :] = values
        self.keys = self._key_buf[..., :length, :]
        self.values = self._value_buf[..., :length, :]
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._key_buf.shape[-2]:
            self.set(self.keys, self.values, spare=max(64, length, new))
        self._key_buf[..., length : length + new, :] = key_states
        self._value_buf[..., length : length + new, :] = value_states
        self.keys = self._key_buf[..., : length + new, :]
        self.values = self._value_buf[..., : length + new, :]
        return self.keys, self.values


class _CatBatch(RunningBatch):
    """The previous ``RunningBatch``: ``cat`` on join, ``index_select`` on leave, 2-D mask."""

    def add(self, cache, mask, positions):
        if self.cache is None:
            cache.layers = [_CatLayer(layer.keys, layer.values) for layer in cache.layers]
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        length = max(self.length, mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.set(torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)]),
                     torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)]))
        pad = lambda m: torch.nn.functional.pad(m, (length - m.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(mask)])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows):
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in self.cache.layers:
            layer.set(layer.keys.index_select(0, index)[..., start:, :],
                      layer.values.index_select(0, index)[..., start:, :])
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)

    @torch.inference_mode()
    def decode(self, model, input_ids):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        out = model(input_ids=torch.tensor(input_ids)[:, None], attention_mask=self.mask,
                    position_ids=self.positions[:, None], use_cache=True,
                    **{_cache_arg(type(model)): self.cache})
        self.positions = self.positions + 1
        return out.logits[:, -1, :].float()


@pytest.fixture(scope="module")
def model_tok():
    torch.set_num_threads(1)
    return tiny("xs", seed=0)


def _requests(turn: int) -> list[GenerateRequest]:
    """Long-tailed lengths, greedy and sampled rows (top-k / top-p, n > 1, top log-probs),
    two sessions whose second turn hits the prefix cache."""
    out = []
    for i in range(9):
        sampled = i % 3 != 0
        sp = SamplingParams(max_tokens=[3, 40, 7, 90, 12, 5, 60, 9, 25][i],
                            temperature=0.9 if sampled else 0.0, seed=7 * i + turn,
                            top_k=20 if i % 3 == 1 else 0, top_p=0.8 if i == 5 else 1.0,
                            n=2 if i == 4 else 1, top_logprobs=3 if i == 2 else 0)
        prompt = list(range(5 + i, 12 + 5 * i))
        out.append(GenerateRequest(prompt, sp, session_id=f"s{i}" if i in (1, 6) else None))
    return out


def _flat(results) -> list:
    return [(o.token_ids, o.logprobs, o.top_logprobs, o.versions, o.finish_reason)
            for r in results for o in r.outputs]


async def _serve(model, tok) -> tuple[list, int]:
    async with LocalEngine(model, tok, max_batch_size=5) as engine:
        first = _requests(0)
        results = await asyncio.gather(*(engine.generate(r) for r in first))
        # turn 2: the sessions re-send their history (prefix-cache hits), every row rejoins
        second = []
        for r, res in zip(first, results, strict=True):
            prompt = r.prompt_ids + res.outputs[0].token_ids + [3, 4]
            second.append(GenerateRequest(prompt, r.sampling, session_id=r.session_id))
        results += await asyncio.gather(*(engine.generate(r) for r in second))
        await engine.update_weights(WeightUpdate(named_tensors=list(model.state_dict().items())))
        results += await asyncio.gather(*(engine.generate(r) for r in _requests(1)[:4]))
        return _flat(results), engine.prefill_counts.reused


async def test_engine_outputs_equal_the_cat_storage_bit_for_bit(model_tok, monkeypatch):
    model, tok = model_tok
    new, reused = await _serve(model, tok)
    monkeypatch.setattr(local_mod, "RunningBatch", lambda rows=0: _CatBatch())
    old, old_reused = await _serve(model, tok)
    assert reused == old_reused > 0  # the prefix cache was used on both sides
    assert new == old  # == on floats: the same bits (no NaN among log-probs)
    assert sum(len(o[0]) for o in new) > 400


def test_decode_steps_equal_the_cat_storage_bit_for_bit(model_tok):
    """Joins (longer and shorter than the batch), leaves (any rows), 130 decode steps: the
    same logits and the same live keys/values after every operation."""
    model, _ = model_tok
    from areal_agents.engines.scheduler import prefill

    new, old = RunningBatch(rows=6), _CatBatch()
    gen = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(5, 500, (n,), generator=gen)]
               for n in (9, 4, 30, 17, 6, 12, 50)]
    plan = {0: ("add", [0, 1]), 3: ("add", [2]), 10: ("keep", [1, 2]), 11: ("add", [3, 4]),
            20: ("keep", [0, 2]), 21: ("add", [5, 6, 1]), 30: ("keep", [3, 0, 2]),
            45: ("keep", [1]), 46: ("add", [0, 4]), 125: ("keep", [1, 2])}
    ids: list[int] = []
    for step in range(130):  # > 64 steps after a join: a forward pass regrows the buffer
        action = plan.get(step)
        for batch in (new, old):
            if action and action[0] == "add":
                cache, mask, pos, _ = prefill(model, [prompts[i] for i in action[1]],
                                              [1] * len(action[1]), torch.device("cpu"))
                batch.add(cache, mask, pos)
            elif action:
                batch.keep(action[1])
        if action and action[0] == "add":
            ids += [7 + len(ids) % 3] * len(action[1])
        elif action:
            ids = [ids[i] for i in action[1]]
        logits_new = new.decode(model, ids)
        logits_old = old.decode(model, ids)
        assert torch.equal(logits_new, logits_old), step
        assert torch.equal(new.mask, old.mask) and torch.equal(new.positions, old.positions)
        for a, b in zip(new.cache.layers, old.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), step
        ids = logits_new.argmax(-1).tolist()


def test_keep_closes_rows_up_in_place_and_append_rows_fills_spare_rows():
    keys = torch.randn(4, 2, 10, 3)
    layer = BufferedLayer(keys, -keys, rows=6)
    buffer = layer._key_buf
    layer.keep([1, 3], start=2)
    assert layer._key_buf is buffer  # no new buffer
    assert torch.equal(layer.keys, keys[[1, 3], :, 2:])
    assert torch.equal(layer.values, -keys[[1, 3], :, 2:])
    short = torch.randn(3, 2, 5, 3)
    layer.append_rows(short, -short)
    assert layer._key_buf is buffer  # 2 + 3 rows fit in 6
    expected = torch.cat([keys[[1, 3], :, 2:], _left_pad(short, 8)])
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
    longer = torch.randn(1, 2, 9, 3)  # one column more: the 2 columns dropped at keep are reused
    layer.append_rows(longer, -longer)
    assert layer._key_buf is buffer
    expected = torch.cat([_left_pad(expected, 9), longer])
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
    layer.append_rows(longer, -longer)  # a 7th row: new buffers
    assert layer._key_buf is not buffer and layer.row_capacity == 7
    assert torch.equal(layer.keys, torch.cat([expected, longer]))
    layer.keep([2, 0], start=0)  # not ascending: gathered
    assert torch.equal(layer.keys, expected[[2, 0]])


def test_the_4d_mask_is_the_one_the_model_builds(model_tok):
    model, _ = model_tok
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    cache = DynamicCache(config=model.config)
    cache.layers = [BufferedLayer(torch.zeros(3, 2, 4, 32), torch.zeros(3, 2, 4, 32))
                    for _ in cache.layers]
    built = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(3, 1, 128),
                               attention_mask=mask, cache=cache,
                               position_ids=torch.tensor([[2], [4], [3]]))
    assert built.shape == (3, 1, 1, 5) and torch.equal(built, mask.bool()[:, None, None, :])
    unpadded = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(3, 1, 128),
                                  attention_mask=torch.ones_like(mask), cache=cache,
                                  position_ids=torch.tensor([[4], [4], [4]]))
    assert unpadded is None  # so decode passes None when no row is padded


def test_row_kv_with_the_known_length_equals_counting_the_mask(model_tok):
    """``row_kv(row, length)`` (the engine passes prompt + fed tokens) returns the same copies
    as ``row_kv(row)``, which counts the row's mask, for padded rows of several lengths."""
    model, _ = model_tok
    from areal_agents.engines.scheduler import prefill

    batch = RunningBatch(rows=4)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    batch.add(*prefill(model, prompts, [1, 2, 1], torch.device("cpu"))[:3])
    batch.decode(model, [20, 21, 22, 23])
    for row, length in enumerate([4, 8, 8, 6]):
        keys, values = batch.row_kv(row, length)
        want_keys, want_values = batch.row_kv(row)
        assert keys[0].shape[-2] == length
        assert all(torch.equal(a, b) for a, b in zip(keys + values, want_keys + want_values,
                                                      strict=True))


async def test_stop_strings_memo_gives_the_outputs_of_decoding_every_window(model_tok,
                                                                            monkeypatch):
    """The engine's remembered stop-string windows (``_hit_stop_string``) end the same
    completions at the same tokens as decoding each window afresh."""
    model, tok = model_tok

    async def serve() -> tuple[list, int]:
        async with LocalEngine(model, tok, max_batch_size=8) as engine:
            stops = [tok.decode([t]) for t in (40, 41, 42, 60, 61)]  # frequent short pieces
            requests = [GenerateRequest(list(range(5 + i, 20 + i)), SamplingParams(
                max_tokens=30, temperature=1.0, seed=i, stop=stops[i % 3: i % 3 + 2]))
                for i in range(12)]
            results = await asyncio.gather(*(engine.generate(r) for r in requests))
            return _flat(results), len(engine._tail_texts)

    new, remembered = await serve()
    assert remembered > 0  # the windows were decoded once and remembered

    def fresh(self, token_ids, stops):
        window = max(len(s.encode()) for s in stops) + 1
        tail = self.tokenizer.decode(token_ids[-window:], skip_special_tokens=False)
        return any(s and s in tail for s in stops)

    monkeypatch.setattr(LocalEngine, "_hit_stop_string", fresh)
    assert new == (await serve())[0]
    assert any(o[4] == "stop" for o in new)  # some stop string ended a completion


def test_rows_kv_copies_rows_of_one_length_together(model_tok):
    """``rows_kv(rows, length)`` gives each row exactly ``row_kv(row)``'s keys and values
    (one copy per layer for the group; rows in any order; one row is row_kv's own copy)."""
    model, _ = model_tok
    from areal_agents.engines.scheduler import prefill

    batch = RunningBatch(rows=6)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17]]
    batch.add(*prefill(model, prompts, [2, 1, 3], torch.device("cpu"))[:3])
    batch.decode(model, [20, 21, 22, 23, 24, 25])
    for rows in ([0, 1], [5, 0, 3], [2]):  # rows 0-1 and 3-5: 6 real positions each
        length = 4 if rows == [2] else 6
        for row, (keys, values) in zip(rows, batch.rows_kv(rows, length), strict=True):
            want_keys, want_values = batch.row_kv(row)
            assert [k.shape for k in keys] == [w.shape for w in want_keys]
            assert all(torch.equal(a, b) for a, b in zip(keys + values, want_keys + want_values,
                                                          strict=True))
