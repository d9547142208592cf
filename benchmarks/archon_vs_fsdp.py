"""Training throughput: ArchonEngine vs FSDPEngine, and PP=2 ZBVZeroBubble vs 1F1B step time.

Same tiny-factory model, same batch, same loss for both backends. Prints both sides and the
ratio (targets: Archon/FSDP tokens/s >= 1.2x; ZBVZeroBubble/1F1B step time < 0.9). CPU + gloo
by default. On a shared machine each figure is the fastest of ``--steps`` steps, and the two sides
are run alternately ``--rounds`` times (median reported) so load changes hit both equally.

    python benchmarks/archon_vs_fsdp.py [--size xs] [--steps 6] [--rounds 3] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from areal_agents.samples import Sample, collate


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch):
        n = seq - (i % 4) * (seq // 8)  # a few different lengths, like RL rollouts
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        samples.append(Sample(ids, [0] * (n // 4) + [1] * (n - n // 4), [0.0] * n, [0] * n))
    b = collate(samples)
    b.advantages = torch.randn(b.input_ids.shape, generator=g)
    b.loss_weights = b.loss_mask / b.loss_mask.sum()
    return b


def loss_fn(logprobs, entropy, mb):
    return -(mb.advantages * logprobs * mb.loss_weights).sum(), {}


def build(backend: str, opts: dict):
    from areal_agents.models import tiny

    hf, _ = tiny(opts["size"], seed=0, **opts.get("overrides", {}))
    kwargs = dict(lr=1e-4, token_budget=opts["budget"])
    if backend == "fsdp":
        from areal_agents.trainers.fsdp.engine import FSDPEngine

        return FSDPEngine(hf, **kwargs)
    from areal_agents.trainers.archon import ArchonEngine

    return ArchonEngine(hf, **kwargs, **opts.get("archon", {}))


def time_steps(engine, batch, steps: int) -> list[float]:
    engine.train_step(batch, loss_fn)  # warm-up
    times = []
    for _ in range(steps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        engine.train_step(batch, loss_fn)
        times.append(time.perf_counter() - t0)
    return times


def run(backend: str, opts: dict) -> float:
    """Fastest seconds per training step (the least-disturbed step on a shared machine)."""
    torch.manual_seed(0)
    engine = build(backend, opts)
    batch = make_batch(engine_vocab(), opts["batch"], opts["seq"])
    return min(time_steps(engine, batch, opts["steps"]))


def alternate(fn_a, fn_b, rounds: int) -> tuple[float, float]:
    """Run ``a, b, a, b, ...`` and keep each side's median over rounds (load drifts over time,
    so alternating keeps the comparison fair)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(fn_a())
        b.append(fn_b())
    return statistics.median(a), statistics.median(b)


def engine_vocab() -> int:
    from areal_agents.models.tiny import VOCAB_SIZE

    return VOCAB_SIZE


def _worker(rank: int, world: int, port: int, out: str, backend: str, opts: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sec = run(backend, opts)
        if rank == 0:
            torch.save(sec, out)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo threads may abort in C++ teardown after the work is done


def run_distributed(backend: str, opts: dict, world: int = 2) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "sec.pt")
    mp.spawn(_worker, args=(world, port, out, backend, opts), nprocs=world, join=True)
    return torch.load(out)


def report(title: str, a_name: str, a: float, b_name: str, b: float, tokens: int, target: str) -> None:
    print(f"\n{title}")
    print(f"  {a_name:<22} {a * 1e3:9.1f} ms/step  {tokens / a:10.0f} tokens/s")
    print(f"  {b_name:<22} {b * 1e3:9.1f} ms/step  {tokens / b:10.0f} tokens/s")
    print(f"  ratio: {target}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="xs")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="alternating repetitions per comparison")
    p.add_argument("--skip-pp", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    opts = dict(size=a.size, steps=a.steps, batch=a.batch, seq=a.seq, budget=a.batch * a.seq)
    tokens = make_batch(engine_vocab(), a.batch, a.seq).num_tokens
    print(f"tiny('{a.size}'), batch {a.batch} x <= {a.seq} tokens ({tokens} real), "
          f"best of {a.steps} steps, median of {a.rounds} alternating rounds, 1 thread per process")

    r = a.rounds
    fsdp1, archon1 = alternate(lambda: run("fsdp", opts), lambda: run("archon", opts), r)
    report("single process", "FSDPEngine", fsdp1, "ArchonEngine", archon1, tokens,
           f"Archon/FSDP tokens/s = {fsdp1 / archon1:.2f}x (target >= 1.2x)")
    fsdp2, archon2 = alternate(lambda: run_distributed("fsdp", opts),
                               lambda: run_distributed("archon", opts), r)
    report("2 processes (FSDP2 dp_shard=2, gloo)", "FSDPEngine", fsdp2, "ArchonEngine", archon2, tokens,
           f"Archon/FSDP tokens/s = {fsdp2 / archon2:.2f}x (target >= 1.2x)")
    if a.skip_pp:
        return
    # PP needs untied embeddings and >= 4 layers for the 2-stages-per-rank schedules
    pp_opts = dict(opts, overrides={"num_hidden_layers": 4, "tie_word_embeddings": False})
    f1b, zbv = alternate(
        lambda: run_distributed("archon", dict(pp_opts, archon={"pp": 2, "pp_schedule": "1F1B", "pp_microbatches": 8})),
        lambda: run_distributed("archon", dict(pp_opts, archon={"pp": 2, "pp_schedule": "ZBVZeroBubble", "pp_microbatches": 8})),
        r)
    report("PP=2, 8 micro-batches, 4 layers", "1F1B", f1b, "ZBVZeroBubble", zbv, tokens,
           f"ZBVZeroBubble/1F1B step time = {zbv / f1b:.2f} (target < 0.9)")


if __name__ == "__main__":
    main()
