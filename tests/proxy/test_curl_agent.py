"""``examples/proxy/curl_agent.sh``: a curl-only agent whose sessions become training groups."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread
from areal_agents.models import tiny_tokenizer
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.testing.engine import ScriptedEngine
from areal_agents.trainers.external import ExternalEpisodes

SCRIPT = Path(__file__).resolve().parents[2] / "examples/proxy/curl_agent.sh"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl, jq")
async def test_curl_agent_sessions_become_groups_and_the_ledger_adds_up():
    tok = tiny_tokenizer()

    def solve(request, index):  # answers "a + b =" right, except for task 1 ("1 + 7")
        a, b = map(int, re.findall(r"(\d) \+ (\d) =", tok.decode(request.prompt_ids))[-1])
        return str(a + b) if (a, b) != (1, 7) else "no"

    src = ExternalEpisodes({"solver": StalenessControl(8, 0, 8)}, group_size=2)
    gw = Gateway(admin_key="k", session_gate=src.admit, session_sink=src.on_session_end)
    gw.add_policy("solver", [ScriptedEngine(solve, tokenizer=tok)], tok)
    with ServerThread(gw.app) as server:
        run = subprocess.run(["bash", str(SCRIPT), server.url, "4", "2"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "ADMIN": "k"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["curl-0\t1.0\t0", "curl-0\t1.0\t0",
                                       "curl-1\t0.0\tno", "curl-1\t0.0\tno"]
    groups = await src.take("solver", 4)
    assert [(g.meta["task_id"], [s.reward for s in g.samples]) for g in groups] == [
        ("curl-0", [1.0, 1.0]), ("curl-1", [0.0, 0.0])]
    assert src.ledger["solver"] == {"trained": 4}
    assert src.controls["solver"].submitted == 4
    await gw.close()
