"""Archon weights reach the embedded engine: in-memory push and an Archon-saved checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from areal_agents.engines.base import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.samples import Sample, collate
from areal_agents.trainers.archon import ArchonEngine

from .archon_helpers import make_batch, pg_loss


@pytest.mark.parametrize("via", ["named_tensors", "path"])
async def test_engine_logprobs_match_archon_after_push(tmp_path, via):
    from areal_agents.engines.local import LocalEngine
    from areal_agents.models import tiny

    hf, tok = tiny("xs", seed=0)
    trainer = ArchonEngine(copy.deepcopy(hf), lr=1e-2)
    trainer.train_step(make_batch(vocab=hf.config.vocab_size), pg_loss)
    engine = LocalEngine(hf, tok)
    try:
        if via == "path":
            trainer.save_hf(str(tmp_path))
            update = WeightUpdate(path=str(tmp_path), version=1)
        else:
            update = WeightUpdate(named_tensors=trainer.export_weights(), version=1)
        await engine.update_weights(update)
        prompt = tok("Guess 42: higher", add_special_tokens=False)["input_ids"]
        result = await engine.generate(GenerateRequest(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=3)))
        out = result.outputs[0]
        assert set(out.versions) == {1}
        ids = prompt + out.token_ids
        mask = [0] * len(prompt) + [1] * len(out.token_ids)
        batch = collate([Sample(ids, mask, [0.0] * len(ids), [0] * len(ids))])
        lp = trainer.forward_logprobs(batch)[0, len(prompt):]
        assert torch.allclose(lp, torch.tensor(out.logprobs), atol=1e-4)
    finally:
        await engine.close()
