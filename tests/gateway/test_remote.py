"""RemoteGateway: an LLMAgent driving a gateway served on a local port, samples over HTTP."""

from __future__ import annotations

import areal_agents as aa
from areal_agents.agents.llm import LLMAgent
from areal_agents.client import RemoteGateway
from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread
from areal_agents.testing.engine import ScriptedEngine


async def test_episode_through_served_gateway(tok):
    gw = Gateway(admin_key="remote-admin")
    gw.add_policy("p", [ScriptedEngine(
        ['<tool_call>{"name": "calculator", "arguments": {"expression": "2 * 3"}}</tool_call>',
         "Answer: 6"], tokenizer=tok)], tok)
    env = aa.make("Calculator-v0", max_turns=5)
    with ServerThread(gw.app) as server:
        remote = RemoteGateway(server.url, "remote-admin")
        agent = LLMAgent.for_gateway(remote, "p", tools=env.tools, agent_id="solo",
                                     metadata={"group": "g7"}, keep_sessions=True)
        episode = await aa.run_episode(env, agent, seed=1)
    assert episode.length == 2 and episode.error is None
    (s,) = episode.samples["agent"]
    local = gw.session(agent.last_session.session_id)  # the server's own record
    assert local.ended
    expected, report = local.to_samples(reward=episode.returns["agent"], agent="solo",
                                        group="g7")
    assert report.num_splits == 0 and agent.last_report.num_splits == 0
    assert (s.token_ids, s.loss_mask, s.logprobs, s.versions) == (
        expected[0].token_ids, expected[0].loss_mask, expected[0].logprobs,
        expected[0].versions)
    assert s.group == "g7" and s.agent == "solo" and s.num_generated == sum(
        len(t.completion_ids) for t in local.turns)
