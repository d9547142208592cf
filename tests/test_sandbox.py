"""The sandbox contains what untrusted code does and reports it: real processes, small limits."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path

import pytest

from areal_agents import sandbox as sandbox_module
from areal_agents.sandbox import Sandbox, isolation

NAMESPACES = isolation() == "netns"
ROOT = os.geteuid() == 0


@pytest.fixture
def make_sandbox():
    made: list[Sandbox] = []

    def make(**kwargs) -> Sandbox:
        kwargs.setdefault("timeout", 20.0)
        made.append(Sandbox(**kwargs))
        return made[-1]

    yield make
    for box in made:
        box.close()


def _stat(pid: int | str) -> list[str] | None:
    """``[state, ppid, pgrp, ...]`` of a process (None: gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _gone(pid: int) -> bool:
    """Gone or a zombie (dead; waiting for init to reap it)."""
    stat = _stat(pid)
    return stat is None or stat[0] in "ZX"


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are neither gone nor zombies."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and (s := _stat(p)) is not None and s[2] == str(pgid) and s[0] not in "ZX"]


def test_runs_source_with_stdin_and_files(make_sandbox):
    code = "import helper, sys\nprint(helper.twice(int(sys.stdin.read())))"
    result = make_sandbox().run_sync(code, stdin="21", files={"helper.py": "twice = lambda x: 2*x"})
    assert (result.returncode, result.stdout, result.killed_by, result.ok) == (0, "42\n", None, True)
    assert result.summary() == "exit status 0"


def test_runs_an_argv(make_sandbox):
    result = make_sandbox().run_sync(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "hi\n", "oops\n")


def test_infinite_loop_times_out_and_its_process_group_is_gone(make_sandbox):
    code = ("import os, subprocess, sys\n"
            "child = subprocess.Popen(['sleep', '600'])\n"
            "print(os.getpgrp(), child.pid, flush=True)\n"
            "while True: pass\n")
    result = make_sandbox(cpu_seconds=60).run_sync(code, timeout=3.0)
    assert (result.timed_out, result.killed_by, result.returncode) == (True, "wall_timeout", -9)
    assert result.summary().startswith("timed out after")
    pgid, child = map(int, result.stdout.split())
    assert _gone(child)
    assert _live_members(pgid) == []


def test_cpu_limit_kills_a_busy_loop(make_sandbox):
    result = make_sandbox(cpu_seconds=1, timeout=60.0).run_sync("while True: pass")
    assert (result.killed_by, result.timed_out) == ("cpu_limit", False)
    assert result.cpu_seconds >= 0.9


def test_children_left_behind_are_killed_when_the_main_process_exits(make_sandbox):
    code = ("import subprocess\n"
            "print(subprocess.Popen(['sleep', '600'], stdout=subprocess.DEVNULL).pid)\n")
    result = make_sandbox().run_sync(code, timeout=60.0)
    assert (result.returncode, result.killed_by, result.timed_out) == (0, None, False)
    assert _gone(int(result.stdout))


def test_fork_bomb_is_limited_and_killed(make_sandbox):
    if not ROOT:
        pytest.skip("as a non-root user RLIMIT_NPROC counts all the user's processes")
    code = ("import os, time\n"
            "print(os.getpgrp(), flush=True)\n"
            "for _ in range(1000):\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        print('fork refused', flush=True)\n"
            "        break\n"
            "time.sleep(600)\n")
    box = make_sandbox(max_processes=8)
    result = box.run_sync(code, timeout=4.0)
    assert result.killed_by == "wall_timeout"
    lines = result.stdout.split()
    assert "refused" in lines and 1 <= lines.count("refused") <= 8
    assert _live_members(int(lines[0])) == []
    assert [sandbox_module._pids_of(uid) for uid in box.slot_uids] == [[]] * 4


def test_memory_hog_gets_memory_error(make_sandbox):
    result = make_sandbox(memory_bytes=256 << 20).run_sync("x = bytearray(2 << 30)")
    assert (result.returncode, result.memory_exceeded) == (1, True)
    assert result.stderr.rstrip().endswith("MemoryError")
    assert result.summary() == "ran out of memory"


def test_output_flood_is_capped_and_stopped(make_sandbox):
    result = make_sandbox(max_output_bytes=1000).run_sync("while True: print('x' * 100)")
    assert (result.truncated, result.killed_by, result.ok) == (True, "output_limit", False)
    assert result.stdout.endswith("\n[output truncated: more than 1000 bytes]")
    assert len(result.stdout) < 1000 + 100


def test_work_dir_is_the_cwd_and_home_and_is_removed(make_sandbox):
    code = "import os, tempfile; print(os.getcwd(), os.environ['HOME'], tempfile.gettempdir())"
    result = make_sandbox().run_sync(code)
    cwd, home, tmp = result.stdout.split()
    assert cwd == home == tmp and Path(cwd).name.startswith("aa-sandbox-")
    assert not Path(cwd).exists()


@pytest.mark.skipif(not NAMESPACES, reason="needs network + mount namespaces")
def test_writes_to_tmp_stay_in_a_private_tmpfs(make_sandbox):
    target = Path("/tmp", f"aa-escape-{uuid.uuid4().hex}")
    result = make_sandbox().run_sync(f"open({str(target)!r}, 'w').write('x'); print('wrote')")
    assert result.stdout == "wrote\n"
    assert not target.exists()


@pytest.mark.skipif(not ROOT, reason="as a non-root user the code may write where the user can")
def test_writes_outside_the_work_dir_are_refused_as_root(make_sandbox):
    target = Path(os.getcwd(), f"aa-escape-{uuid.uuid4().hex}")
    result = make_sandbox().run_sync(f"open({str(target)!r}, 'w')")
    assert result.returncode == 1 and "PermissionError" in result.stderr
    assert not target.exists()


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    return server


@pytest.mark.parametrize("mode", ["probed", "python-guard"])
def test_opening_a_socket_is_refused(make_sandbox, monkeypatch, mode):
    if mode == "python-guard":
        monkeypatch.setattr(sandbox_module, "isolation", lambda python: "python-guard")
    with _listener() as server:
        port = server.getsockname()[1]
        result = make_sandbox().run_sync(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)")
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.returncode == 1
    expected = {"netns": "Network is unreachable",
                "python-guard": "network access is disabled in this sandbox"}
    assert result.network_isolation == (isolation() if mode == "probed" else mode)
    assert expected[result.network_isolation] in result.stderr


def test_network_allow_reports_none(make_sandbox):
    result = make_sandbox(network="allow").run_sync("print('x')")
    assert (result.network_isolation, result.stdout) == ("none", "x\n")


async def test_cancelling_a_run_kills_it_and_frees_the_slot(make_sandbox):
    box = make_sandbox(max_concurrency=1, timeout=600.0, cpu_seconds=600)
    task = asyncio.create_task(box.run("while True: pass"))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await asyncio.wait_for(box.run("print('next')"), 120)
    assert result.stdout == "next\n"


async def test_async_runs_respect_the_concurrency_limit(make_sandbox):
    box = make_sandbox(max_concurrency=2)
    results = await asyncio.gather(*(box.run(f"print({i})") for i in range(5)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]


def test_sandboxes_get_distinct_slot_uids_as_root(make_sandbox):
    if not ROOT:
        pytest.skip("slot uids are used as root only")
    first, second = make_sandbox(max_concurrency=3), make_sandbox(max_concurrency=2)
    uids = first.slot_uids + second.slot_uids
    assert len(set(uids)) == 5 and all(u >= 2_000_000_000 for u in uids)
    assert make_sandbox(uid_base=None).slot_uids == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        Sandbox(timeout=0)
    with pytest.raises(ValueError, match="network must be 'deny' or 'allow', got 'open'"):
        Sandbox(network="open")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["../escape.py", "/etc/escape", ".stdin", "a/../../b"])
def test_files_must_stay_in_the_work_dir(make_sandbox, name):
    with pytest.raises(ValueError, match=f"files: {name!r} must be a relative path inside"):
        make_sandbox().run_sync("pass", files={name: "x"})
