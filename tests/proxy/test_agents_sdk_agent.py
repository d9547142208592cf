"""``examples/proxy/agents_sdk_agent.py`` in a separate process: the OpenAI Agents SDK (default
Responses model) calls the function tool and answers through ``/v1/responses``; its sessions
become training groups and the ledger adds up."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread
from areal_agents.models import tiny_tokenizer
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.external import ExternalEpisodes

AGENT = Path(__file__).resolve().parents[2] / "examples/proxy/agents_sdk_agent.py"


def _sdk_installed() -> bool:
    try:
        importlib.metadata.version("openai-agents")  # `import agents` here finds the repo's
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow  # the agent process imports the SDK and torch: ~26 s at load 14
@pytest.mark.skipif(not _sdk_installed(), reason="needs openai-agents (the agents_sdk extra)")
async def test_agents_sdk_agent_calls_its_tool_and_its_sessions_are_trained_on(tmp_path):
    tok = tiny_tokenizer()

    def model(request, index):  # call `add` on the question, then answer with its result
        prompt = tok.decode(request.prompt_ids)
        result = re.findall(r"<\|im_start\|>tool\n(\d+)<\|im_end\|>", prompt)
        if result:
            return result[-1]
        a, b = re.findall(r"(\d) \+ (\d) =", prompt)[-1]
        return f'<tool_call>{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'

    src = ExternalEpisodes({"solver": StalenessControl(8, 0, 8)}, group_size=2)
    gw = Gateway(admin_key="k", session_gate=src.admit, session_sink=src.on_session_end)
    gw.add_policy("solver", [ScriptedEngine(model, tokenizer=tok)], tok)
    with ServerThread(gw.app) as server:
        run = subprocess.run(
            [sys.executable, str(AGENT), "--url", server.url, "--key", "k", "--group-size",
             "2", "--episodes", "4", "--concurrency", "1", "--max-tokens", "64"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    episodes = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(e["task_id"], e["reward"], e["tool_calls"]) for e in episodes] == [
        ("q0", 1.0, 1), ("q0", 1.0, 1), ("q1", 1.0, 1), ("q1", 1.0, 1)]
    groups = await src.take("solver", 4)
    assert [g.meta["task_id"] for g in groups] == ["q0", "q1"]
    for sample in (s for g in groups for s in g.samples):  # tool call + answer: one sample
        assert sample.agent == "calculator" and sample.reward == 1.0
        assert sample.meta["turns"] == [0, 1]
    assert src.ledger["solver"] == {"trained": 4} and src.controls["solver"].submitted == 4
    await gw.close()
