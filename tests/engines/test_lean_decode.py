"""``RunningBatch.decode`` runs allow-listed models module by module (``_lean_forward``) instead
of through ``model(...)``'s wrappers, and their decoder layers inline (``lean_decode``). Pinned
bit for bit against the model's own forward for every allow-listed class, with and without GQA,
biases and LoRA adapters, over padded and unpadded batches (decode logits over joins and
leaves; LocalEngine's tokens, log-probs, top log-probs, versions), and refused where the skipped
wrappers could matter (hooks, an instance-level forward, classes not on the list, layers with
sliding windows, dropout or another attention implementation)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from areal_agents.engines import lean_decode, scheduler
from areal_agents.engines.lora import AdapterSpec, LoRAAdapters
from areal_agents.engines.scheduler import RunningBatch, _lean_decode, prefill
from areal_agents.models import tiny

from .test_batch_storage import _serve

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _model(name: str) -> torch.nn.Module:
    """qwen3: GQA with q/k norms (tiny "xs"); qwen2: GQA with q/k/v biases; llama: GQA;
    llama-mha: one key/value head per query head, attention and MLP biases."""
    torch.manual_seed(0)
    if name == "qwen3":
        return tiny("xs", seed=0)[0]
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    if name == "llama-mha":
        config = LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, attention_bias=True,
                             mlp_bias=True)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # biases start at zero: make them count
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
        return model
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


class _LayerCount:
    """Counts the decoder layers ``lean_decode`` computed inline (``_decode_layer`` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        inner = lean_decode._decode_layer

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(lean_decode, "_decode_layer", counted)


def _decode_logits(model: torch.nn.Module, padded: list[bool] | None = None
                   ) -> list[torch.Tensor]:
    """Logits of 40 decode steps with joins (shorter and longer prompts) and leaves; whether
    each step's batch had padding is appended to ``padded``."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [[int(t) for t in torch.randint(5, vocab, (n,), generator=gen)]
               for n in (9, 4, 30, 17, 6)]
    plan = {0: ("add", [0, 1]), 5: ("add", [2]), 12: ("keep", [0, 2]), 13: ("add", [3, 4]),
            25: ("keep", [1, 3]), 33: ("keep", [1])}
    batch, ids, out = RunningBatch(rows=4), [], []
    for step in range(40):
        action = plan.get(step)
        if action and action[0] == "add":
            cache, mask, pos, _ = prefill(model, [prompts[i] for i in action[1]],
                                          [1] * len(action[1]), torch.device("cpu"))
            batch.add(cache, mask, pos)
            ids += [7 + len(ids) % 3] * len(action[1])
        elif action:
            batch.keep(action[1])
            ids = [ids[i] for i in action[1]]
        if padded is not None:
            padded.append(not bool(batch.mask.all()))
        logits = batch.decode(model, ids)
        out.append(logits)
        ids = logits.argmax(-1).tolist()
    return out


@pytest.mark.parametrize("name", ["qwen3", "qwen2", "llama", "llama-mha"])
def test_lean_decode_equals_the_models_forward_bit_for_bit(name, monkeypatch):
    torch.set_num_threads(1)
    model = _model(name)
    assert _lean_decode(model)  # the lean path is the one under test
    count, padded = _LayerCount(monkeypatch), []
    lean = _decode_logits(model, padded)
    # every layer of every step inline; padded steps (a 4-D mask: GQA packs the query heads)
    # and unpadded ones (no mask: enable_gqa) both covered
    assert count.calls == 40 * model.config.num_hidden_layers
    assert 0 < sum(padded) < 40
    monkeypatch.setattr(scheduler, "_lean_decode", lambda m: False)
    full = _decode_logits(model)
    assert count.calls == 40 * model.config.num_hidden_layers  # the model's forward: none
    assert len(lean) == len(full) == 40
    for step, (a, b) in enumerate(zip(lean, full, strict=True)):
        assert torch.equal(a, b), step


async def test_engine_outputs_equal_the_models_forward_bit_for_bit(monkeypatch):
    """Greedy and sampled rows, top-k/top-p, n > 1, top log-probs, prefix-cache hits and a
    weight update (``test_batch_storage._serve``): identical with and without the lean path."""
    torch.set_num_threads(1)
    model, tok = tiny("xs", seed=0)
    assert _lean_decode(model)
    lean, reused = await _serve(model, tok)
    monkeypatch.setattr(scheduler, "_lean_decode", lambda m: False)
    full, full_reused = await _serve(model, tok)
    assert reused == full_reused > 0
    assert lean == full  # == on floats: the same bits
    assert sum(len(o[0]) for o in lean) > 400


def test_lean_decode_is_refused_where_the_skipped_wrappers_could_matter():
    model = _model("qwen3")
    assert _lean_decode(model)
    handle = model.register_forward_hook(lambda *args: None)
    assert not _lean_decode(model)  # a hook on the model
    handle.remove()
    handle = model.model.register_forward_pre_hook(lambda *args: None)
    assert not _lean_decode(model)  # a hook on the base model
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert not _lean_decode(model)  # a global module hook
    handle.remove()
    model.forward = model.forward  # an instance-level forward (a wrapper, a meter)
    assert not _lean_decode(model)
    del model.forward
    assert _lean_decode(model)

    class Scaled(type(model)):  # a subclass may change forward: not on the list
        pass

    model.__class__ = Scaled
    assert not _lean_decode(model)


def _with_adapters(model: torch.nn.Module) -> LoRAAdapters:
    """Two random LoRA adapters on q/v projections and the MLP's gate (``MultiLoRALinear``)."""
    adapters = LoRAAdapters(model)
    gen = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        adapters.add(name, AdapterSpec(rank=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
        tensors = []
        for module_name, module in model.named_modules():
            if module_name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "gate_proj"):
                tensors += [(f"{module_name}.lora_A.weight",
                             torch.randn(4, module.in_features, generator=gen)),
                            (f"{module_name}.lora_B.weight",
                             torch.randn(module.out_features, 4, generator=gen))]
        assert adapters.load(name, tensors) == len(tensors)
    return adapters


def test_lora_adapters_run_inline_layers_bit_for_bit(monkeypatch):
    """Adapted projections (``MultiLoRALinear``) are called as modules inside the inline
    layers: each row gets its adapter, the same bits as the model's forward."""
    torch.set_num_threads(1)
    model = _model("qwen3")
    adapters = _with_adapters(model)
    names = [None, "a", "b", "a"]
    prompts = [[5 + (7 * i + j) % 300 for j in range(n)] for i, n in enumerate((9, 4, 12, 4))]

    def decode(steps: int, rows: list[str | None]) -> list[torch.Tensor]:
        cache, mask, pos, _ = prefill(model, prompts, [1] * 4, torch.device("cpu"))
        batch, ids, out = RunningBatch(rows=4), [7, 8, 9, 7], []
        batch.add(cache, mask, pos)
        for _ in range(steps):
            with adapters.rows(rows):
                out.append(batch.decode(model, ids))
            ids = out[-1].argmax(-1).tolist()
        return out

    count = _LayerCount(monkeypatch)
    lean = decode(12, names)
    assert count.calls == 12 * model.config.num_hidden_layers
    base = decode(12, [None] * 4)
    assert not torch.equal(lean[0][1], base[0][1])  # the adapters change the logits
    assert torch.equal(lean[0][0], base[0][0])  # the base row stays the base
    monkeypatch.setattr(scheduler, "_lean_decode", lambda m: False)
    full = decode(12, names)
    for step, (a, b) in enumerate(zip(lean, full, strict=True)):
        assert torch.equal(a, b), step


def test_hooked_modules_run_as_modules_and_hooked_layers_through_their_forward(monkeypatch):
    """A hook on a projection still fires (the projection is called as a module); a hooked
    decoder layer runs its own forward; either way the same bits."""
    torch.set_num_threads(1)
    model = _model("llama")
    layers = model.config.num_hidden_layers
    with monkeypatch.context() as patch:
        patch.setattr(scheduler, "_lean_decode", lambda m: False)
        full_logits = _decode_logits(model)
    seen = []  # (module, tokens per row) of each hook call; prefills call them too
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.append(("down_proj", out.shape[1])))
    count = _LayerCount(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(_decode_logits(model), full_logits, strict=True))
    assert seen.count(("down_proj", 1)) == 40 and count.calls == 40 * layers
    handle.remove()
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(("layer", args[0].shape[1])))
    assert all(torch.equal(a, b) for a, b in zip(_decode_logits(model), full_logits, strict=True))
    assert seen.count(("layer", 1)) == 40
    assert count.calls == 40 * layers + 40 * (layers - 1)  # layer 0 ran its own forward
    handle.remove()


def test_layers_the_inline_path_does_not_cover_run_their_own_forward(monkeypatch):
    model = _model("qwen2")
    family = lean_decode._family(type(model))
    layer, config = model.model.layers[0], model.config
    cache = prefill(model, [[5, 6, 7]], [1], torch.device("cpu"))[0]
    assert lean_decode._lean_layer(layer, family, config, cache)
    layer.self_attn.sliding_window = 16  # a sliding-window layer
    assert not lean_decode._lean_layer(layer, family, config, cache)
    layer.self_attn.sliding_window = None
    layer.self_attn.attention_dropout = 0.1
    layer.train()  # dropout in training mode
    assert not lean_decode._lean_layer(layer, family, config, cache)
    layer.eval()
    assert lean_decode._lean_layer(layer, family, config, cache)  # dropout is off in eval mode
    layer.self_attn.config = type(config)(**SMALL)  # a layer of its own config
    assert not lean_decode._lean_layer(layer, family, config, cache)
    layer.self_attn.config = config

    class Patched(type(layer)):  # a subclass may change forward
        pass

    layer.__class__ = Patched
    assert not lean_decode._lean_layer(layer, family, config, cache)
    layer.__class__ = family.layer
    assert lean_decode._family(LlamaForCausalLM).layer.__name__ == "LlamaDecoderLayer"

    torch.set_num_threads(1)
    model.config._attn_implementation = "eager"  # another attention implementation
    count = _LayerCount(monkeypatch)
    lean = _decode_logits(model)
    assert count.calls == 0  # every layer through its own forward (eager attention)
    monkeypatch.setattr(scheduler, "_lean_decode", lambda m: False)
    assert all(torch.equal(a, b) for a, b in zip(lean, _decode_logits(model), strict=True))
