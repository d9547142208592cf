"""Local tools that time out stop: a sync tool's process is killed, an async tool cancelled;
the sandboxed ``python`` tool runs model code."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from areal_agents.agents.llm import LLMAgent
from areal_agents.sandbox import Sandbox
from areal_agents.sandbox_tool import python_tool
from areal_agents.testing.openai_mock import OpenAIMock
from areal_agents.tool_process import ToolFailed, call_in_process


def call(name, args, call_id="c1"):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


async def _act_with(tool, args, **kwargs) -> str:
    mock = OpenAIMock([{"tool_calls": [call("tool", args)]}, "done"])
    agent = LLMAgent(mock.async_client(), "m", tool_fns={"tool": tool}, **kwargs)
    assert (await agent.act("go"))["content"] == "done"
    return next(m["content"] for m in agent.history if m["role"] == "tool")


async def test_timed_out_sync_tool_leaves_no_side_effect_after_the_timeout(tmp_path):
    marker = tmp_path / "written"

    def slow_write(path):
        time.sleep(1.0)
        Path(path).write_text("too late")
        return "wrote"

    text = await _act_with(slow_write, {"path": str(marker)}, tool_timeout=0.2)
    assert text == "error: tool 'tool' timed out after 0.2s"
    await asyncio.sleep(2.0)  # the thread runner would have written it by now
    assert not marker.exists()


async def test_thread_mode_keeps_the_old_behaviour(tmp_path):
    marker = tmp_path / "written"

    def slow_write(path):
        time.sleep(0.5)
        Path(path).write_text("too late")

    text = await _act_with(slow_write, {"path": str(marker)}, tool_timeout=0.1,
                           sync_tools="thread")
    assert text == "error: tool 'tool' timed out after 0.1s"
    for _ in range(100):  # the documented caveat: a thread cannot be stopped
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.read_text() == "too late"


async def test_timed_out_async_tool_is_cancelled(tmp_path):
    marker = tmp_path / "written"
    cancelled = asyncio.Event()

    async def slow_write(path):
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        Path(path).write_text("too late")

    text = await _act_with(slow_write, {"path": str(marker)}, tool_timeout=0.1)
    assert text == "error: tool 'tool' timed out after 0.1s"
    assert cancelled.is_set()
    await asyncio.sleep(1.5)
    assert not marker.exists()


async def test_process_tools_return_results_closures_and_errors():
    offset = 10
    assert await _act_with(lambda a: a + offset, {"a": 5}) == "15"
    assert await _act_with(lambda: {"k": [1, 2]}, {}) == '{"k": [1, 2]}'
    assert await _act_with(lambda: 1 / 0, {}) == "error: ZeroDivisionError: division by zero"
    unserializable = await _act_with(lambda: object(), {})
    assert unserializable.startswith("error: TypeError: Object of type object is not JSON")


async def test_call_in_process_kills_what_the_tool_spawned(tmp_path):
    def spawn_and_hang():
        import subprocess
        proc = subprocess.Popen(["sleep", "600"])
        (tmp_path / "pid").write_text(str(proc.pid))
        time.sleep(600)

    with pytest.raises(TimeoutError):
        await call_in_process(spawn_and_hang, {}, timeout=1.0)
    pid = int((tmp_path / "pid").read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"


async def test_call_in_process_reports_a_dying_worker():
    import os

    with pytest.raises(ToolFailed, match="died without a result"):
        await call_in_process(lambda: os._exit(3), {}, timeout=30.0)


def test_sync_tools_mode_is_checked():
    with pytest.raises(ValueError, match="sync_tools must be 'process' or 'thread', got 'fork'"):
        LLMAgent(None, "m", sync_tools="fork")  # type: ignore[arg-type]


async def test_sandboxed_python_tool_runs_model_code_and_times_out():
    box = Sandbox(timeout=20.0)
    try:
        tool = python_tool(box)
        assert await _act_with(tool, {"code": "print(2 ** 10)"}) == "1024"
        failed = await _act_with(tool, {"code": "raise SystemExit(4)"})
        assert failed == "[exit status 4]"
        slow = await _act_with(python_tool(box, timeout=1.0), {"code": "while True: pass"})
        assert slow.startswith("[timed out after")
    finally:
        box.close()
