"""``RunningBatch.decode`` runs allow-listed models module by module (``_lean_forward``) instead
of through ``model(...)``'s wrappers. Pinned bit for bit against the model's own forward for
every allow-listed class (decode logits over joins and leaves; LocalEngine's tokens, log-probs,
top log-probs, versions), and refused where the skipped wrappers could matter (hooks, an
instance-level forward, classes not on the list)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from areal_agents.engines import scheduler
from areal_agents.engines.scheduler import RunningBatch, _lean_decode, prefill
from areal_agents.models import tiny

from .test_batch_storage import _serve

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "qwen3":
        return tiny("xs", seed=0)[0]
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


def _decode_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Logits of 40 decode steps with joins (shorter and longer prompts) and leaves."""
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
        logits = batch.decode(model, ids)
        out.append(logits)
        ids = logits.argmax(-1).tolist()
    return out


@pytest.mark.parametrize("name", ["qwen3", "qwen2", "llama"])
def test_lean_decode_equals_the_models_forward_bit_for_bit(name, monkeypatch):
    torch.set_num_threads(1)
    model = _model(name)
    assert _lean_decode(model)  # the lean path is the one under test
    lean = _decode_logits(model)
    monkeypatch.setattr(scheduler, "_lean_decode", lambda m: False)
    full = _decode_logits(model)
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
