"""1,000 concurrent proxy sessions against one served gateway (loopback): latency, errors, RSS.

The gateway runs in a child process (uvicorn on 127.0.0.1, a ``ScriptedEngine`` answering
every request with the same few tokens after ``--latency`` seconds, standing in for decode
time), so its resident memory is measured alone. The client opens ``--sessions`` sessions
at once, then every session plays ``--turns`` chat turns (each extending the previous
conversation, as an agent does), posts a reward and ends; all sessions are alive together
until the end phase. HTTP connections are pooled (``--connections``), so the number of
sockets stays bounded while every session is open.

Reported (one JSON object on stdout, a table on stderr): p50/p99 latency per request kind
(open, chat, reward, end) in ms, errors (non-2xx answers and transport errors, by kind and
status or exception), the
gateway's RSS before (after warm-up), with every session open, and after every session
ended, its ``/health`` session counts at the end, wall time and the load average.

Run: ``OMP_NUM_THREADS=1 python benchmarks/proxy_sessions.py [--sessions 1000] [--turns 2]``
(``--repeat 3`` runs the whole load 3 times on the same server: RSS after each round shows
whether ended sessions are dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import httpx2

ADMIN = "bench-admin-key"
POLICY = "bench"


def serve(port: int, latency: float) -> None:
    """The child process: a gateway with one scripted policy on ``127.0.0.1:port``."""
    import uvicorn

    from areal_agents.gateway import Gateway
    from areal_agents.models import tiny_tokenizer
    from areal_agents.testing.engine import ScriptedEngine

    tok = tiny_tokenizer()
    gw = Gateway(admin_key=ADMIN)
    gw.add_policy(POLICY, [ScriptedEngine(["Answer: 42"], tokenizer=tok, latency=latency)],
                  tok)
    # keep-alive above the client's idle gaps: a pooled connection the server closed while
    # every session waited for the others to open would fail the next request
    uvicorn.run(gw.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                backlog=4096, timeout_keep_alive=300)


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Load:
    """Latencies and errors of one run, per request kind."""

    def __init__(self, http: httpx2.AsyncClient) -> None:
        self.http = http
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)

    async def call(self, kind: str, path: str, body: dict, key: str) -> dict | None:
        t0 = time.perf_counter()
        try:
            r = await self.http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
        except httpx2.TransportError as exc:
            self.errors[f"{kind}:{type(exc).__name__}"] += 1
            return None
        self.latency[kind].append(time.perf_counter() - t0)
        if r.status_code != 200:
            self.errors[f"{kind}:{r.status_code}"] += 1
            return None
        return r.json()

    async def session(self, i: int, turns: int, opened: asyncio.Event, all_open: asyncio.Event,
                      counter: list[int], total: int) -> None:
        s = await self.call("open", "/rl/sessions", {"policy": POLICY, "task_id": i}, ADMIN)
        counter[0] += 1
        if counter[0] == total:
            opened.set()
        await all_open.wait()
        if s is None:
            return
        key, sid = s["api_key"], s["session_id"]
        messages = [{"role": "user", "content": f"What is {i} + 1?"}]
        for _ in range(turns):
            reply = await self.call("chat", "/v1/chat/completions",
                                    {"model": POLICY, "messages": messages, "max_tokens": 8}, key)
            if reply is None:
                break
            messages += [reply["choices"][0]["message"], {"role": "user", "content": "Sure?"}]
        await self.call("reward", f"/rl/sessions/{sid}/reward", {"reward": 1.0}, key)
        await self.call("end", f"/rl/sessions/{sid}/end", {}, key)


async def one_round(url: str, args: argparse.Namespace, pid: int) -> dict:
    limits = httpx2.Limits(max_connections=args.connections,
                           max_keepalive_connections=args.connections)
    async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=120.0) as http:
        load = Load(http)
        opened, all_open = asyncio.Event(), asyncio.Event()
        counter = [0]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(load.session(i, args.turns, opened, all_open, counter,
                                                  args.sessions))
                 for i in range(args.sessions)]
        await opened.wait()
        peak_open = (await http.get("/health")).json()["sessions"]["live"]
        rss_open = rss_mb(pid)
        all_open.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        health = (await http.get("/health")).json()["sessions"]
    return {"wall_s": round(wall, 1), "sessions_open_at_once": peak_open,
            "rss_all_open_mb": round(rss_open, 1), "rss_after_mb": round(rss_mb(pid), 1),
            "health_sessions": health,
            "latency_ms": {k: {"n": len(v), "p50": round(1000 * pct(v, 0.5), 1),
                               "p99": round(1000 * pct(v, 0.99), 1)}
                           for k, v in load.latency.items()},
            "errors": dict(load.errors)}


async def warm_up(url: str) -> None:
    async with httpx2.AsyncClient(base_url=url) as http:
        for _ in range(600):
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx2.TransportError:
                await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"the gateway at {url} did not start")
        s = (await http.post("/rl/sessions", json={"policy": POLICY},
                             headers={"Authorization": f"Bearer {ADMIN}"})).json()
        auth = {"Authorization": f"Bearer {s['api_key']}"}
        await http.post("/v1/chat/completions", headers=auth, json={
            "model": POLICY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        await http.post(f"/rl/sessions/{s['session_id']}/end", headers=auth)


async def main(args: argparse.Namespace) -> dict:
    from areal_agents.gateway.server import free_port

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency",
                              str(args.latency)])
    url = f"http://127.0.0.1:{port}"
    try:
        await warm_up(url)
        before = rss_mb(child.pid)
        rounds = [await one_round(url, args, child.pid) for _ in range(args.repeat)]
    finally:
        child.terminate()
        child.wait(timeout=30)
    return {"sessions": args.sessions, "turns": args.turns, "connections": args.connections,
            "engine_latency_s": args.latency, "rss_before_mb": round(before, 1),
            "rounds": rounds, "load_average": [round(x, 2) for x in os.getloadavg()]}


def report(result: dict) -> None:
    print(f"{result['sessions']} sessions x {result['turns']} turns, "
          f"{result['connections']} connections; gateway RSS before: "
          f"{result['rss_before_mb']} MiB; load {result['load_average']}", file=sys.stderr)
    for i, r in enumerate(result["rounds"]):
        lat = "  ".join(f"{k} p50 {v['p50']} / p99 {v['p99']} ms" for k, v in
                        r["latency_ms"].items())
        print(f"round {i + 1}: {r['wall_s']} s, {r['sessions_open_at_once']} open at once, RSS "
              f"{r['rss_all_open_mb']} MiB all open -> {r['rss_after_mb']} MiB after; errors "
              f"{r['errors'] or 0}; {lat}", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--turns", type=int, default=2, help="chat turns per session")
    p.add_argument("--connections", type=int, default=200, help="HTTP connection pool size")
    p.add_argument("--latency", type=float, default=0.02, help="scripted engine seconds/request")
    p.add_argument("--repeat", type=int, default=1, help="rounds on the same server")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        serve(a.serve, a.latency)
    else:
        out = asyncio.run(main(a))
        report(out)
        print(json.dumps(out))
