"""Export + load into a LocalEngine against a raw ``copy_`` of the state dict.

For Qwen3 models of about 1M, 10M and 50M parameters: the time of
``push_local(LocalEngine, FSDPEngine.export_weights())`` (HF-named export, name and shape
checks, copy into the engine's model) against a bare ``target[name].copy_(source[name])`` loop
over the state dict, plus the safetensors-directory route (write + ``WeightUpdate(path=...)``)
for reference. Prints seconds of each and the ratio export+load / raw (target <= 2x).

Run: ``OMP_NUM_THREADS=2 python benchmarks/weight_sync.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import torch
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.weight_sync import push_local, save_safetensors_dir
from transformers import Qwen3Config, Qwen3ForCausalLM

from areal_agents.engines.base import WeightUpdate
from areal_agents.engines.local import LocalEngine

SIZES = {  # name -> (hidden, layers, vocab)
    "1M": (128, 2, 4096),
    "10M": (256, 6, 16384),
    "50M": (512, 8, 32768),
}


class _Tokenizer:
    eos_token_id = 0


def build(hidden: int, layers: int, vocab: int, seed: int) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=max(1, hidden // 64), head_dim=32,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).float()


def interleaved_min(repeats: int, *fns) -> list[float]:
    """Best time of each fn over ``repeats`` interleaved rounds (fair on a shared machine)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def measure(name: str, repeats: int) -> tuple[int, float, float, float]:
    """``(num_params, raw s, export+load s, via-disk s)`` for one model size."""
    hidden, layers, vocab = SIZES[name]
    trainer = FSDPEngine(build(hidden, layers, vocab, 0), lr=1e-5)
    engine = LocalEngine(build(hidden, layers, vocab, 1), _Tokenizer())
    source = trainer.model.state_dict()
    target = build(hidden, layers, vocab, 2).state_dict()
    loop = asyncio.new_event_loop()

    def raw() -> None:
        with torch.no_grad():
            for k, v in source.items():
                target[k].copy_(v)

    async def timed_push() -> float:  # timed inside the loop, as a trainer would call it
        t = time.perf_counter()
        await push_local(engine, trainer.export_weights())
        return time.perf_counter() - t

    pushes: list[float] = []

    def sync() -> None:
        pushes.append(loop.run_until_complete(timed_push()))

    with tempfile.TemporaryDirectory() as tmp:

        def disk() -> None:
            path = save_safetensors_dir(trainer.export_weights(), f"{tmp}/w")
            loop.run_until_complete(engine.update_weights(WeightUpdate(path=path)))

        t_raw, _ = interleaved_min(repeats, raw, sync)
        t_sync = min(pushes)
        (t_disk,) = interleaved_min(2, disk)
    loop.run_until_complete(engine.close())
    loop.close()
    for k, v in engine.model.state_dict().items():  # the push really landed
        if k in source:
            assert torch.equal(v, source[k]), k
    return sum(p.numel() for p in trainer.model.parameters()), t_raw, t_sync, t_disk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="1M,10M,50M")
    args = ap.parse_args()
    print(f"{'model':>6} {'params':>12} {'raw copy_ ms':>13} {'export+load ms':>15} {'ratio':>7} "
          f"{'via disk ms':>12}")
    for name in args.sizes.split(","):
        num_params, t_raw, t_sync, t_disk = measure(name, args.repeats)
        print(f"{name:>6} {num_params:>12,} {t_raw * 1e3:>13.3f} {t_sync * 1e3:>15.3f} "
              f"{t_sync / t_raw:>6.2f}x {t_disk * 1e3:>12.1f}")
    print("target: export+load / raw <= 2x")


if __name__ == "__main__":
    main()
