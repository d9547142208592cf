"""Gateway overhead: a trivial engine called directly vs through the gateway via the SDK.

The engine (``ScriptedEngine``, no latency) returns 8 fixed tokens, so what is measured is the
gateway's own cost: the SDK, the in-process ASGI transport, JSON, chat templating, tool-call
parsing, session recording. Targets (issue 4): under 2 ms added at p50 in process, over 300
requests/s on a 2-core machine.

Run: ``OMP_NUM_THREADS=1 python benchmarks/gateway_overhead.py [--requests 2000] [--http]``
(``--http`` adds a row through uvicorn on a local port; the in-process rows are the target).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from areal_agents.engines.base import GenerateRequest, SamplingParams
from areal_agents.gateway import Gateway
from areal_agents.models import tiny_tokenizer
from areal_agents.testing.engine import ScriptedEngine

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 12 + 30? Reply 'Answer: N'."}]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def throughput(fn, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await fn()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def main(num_requests: int, concurrency: int, recorded: bool,
               over_http: bool = False) -> None:
    tok = tiny_tokenizer()
    completion = tok("Answer: 42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    engine = ScriptedEngine([completion])
    gw = Gateway()
    gw.add_policy("bench", [engine], tok)
    key = await gw.create_session("bench") if recorded else gw.admin_key
    client = gw.async_client(key)
    prompt = tok(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]

    async def direct() -> None:
        await engine.generate(GenerateRequest(prompt, SamplingParams(max_tokens=16)))

    async def via_gateway() -> None:
        await client.chat.completions.create(model="bench", messages=MESSAGES, max_tokens=16)

    for fn in (direct, via_gateway):  # warm-up
        await timed(fn, 50)
    paths = [("direct engine", direct), ("gateway via SDK", via_gateway)]
    server = None
    if over_http:  # same gateway over a real socket (uvicorn on a background thread)
        from areal_agents.client import async_client_for_url
        from areal_agents.gateway.server import ServerThread

        server = ServerThread(gw.app).__enter__()
        http_client = async_client_for_url(server.url, key)

        async def via_http() -> None:
            await http_client.chat.completions.create(model="bench", messages=MESSAGES,
                                                      max_tokens=16)

        await timed(via_http, 50)
        paths.append(("gateway over HTTP", via_http))
    rows = []
    for name, fn in paths:
        lat = await timed(fn, num_requests)
        rps = await throughput(fn, num_requests, concurrency)
        rows.append((name, statistics.median(lat) * 1e3, pct(lat, 0.99) * 1e3, rps))
    print(f"{num_requests} requests, concurrency {concurrency}, "
          f"{'recorded session' if recorded else 'admin key (not recorded)'}")
    print(f"{'path':<18}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>12}")
    for name, p50, p99, rps in rows:
        print(f"{name:<18}{p50:>10.3f}{p99:>10.3f}{rps:>12.0f}")
    if server is not None:
        server.__exit__()
    (_, d50, d99, drps), (_, g50, g99, grps) = rows[:2]
    print(f"gateway adds {g50 - d50:.3f} ms at p50 ({g99 - d99:.3f} ms at p99); "
          f"throughput ratio gateway/direct = {grps / drps:.4f} "
          f"(latency ratio p50 = {g50 / d50:.1f}x)")
    print(f"targets: < 2 ms added p50 -> {'met' if g50 - d50 < 2 else 'NOT met'}; "
          f"> 300 req/s -> {'met' if grps > 300 else 'NOT met'}")
    if recorded:
        print(f"recorded turns: {len(gw.session(key).turns)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-record", action="store_true",
                        help="call with the admin key (no session recording)")
    parser.add_argument("--http", action="store_true",
                        help="also measure the SDK over a real local port (uvicorn thread)")
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency, not args.no_record, args.http))
