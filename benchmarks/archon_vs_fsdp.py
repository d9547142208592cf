"""Training throughput: ArchonEngine vs FSDPEngine, and PP=2 ZBVZeroBubble vs 1F1B step time.

Same tiny-factory model (same weights), same batch, same loss, same AdamW settings on both
backends. Prints both sides and the ratio (targets: Archon/FSDP tokens/s >= 1.2x;
ZBVZeroBubble/1F1B step time < 0.9). CPU + gloo, one thread per process.

Fair on a shared machine: every engine under comparison is built in the same process(es) and
they take training steps *alternately* (a, b, c, a, b, c, ...), so load changes hit all sides
alike; each figure is the median over ``--rounds`` such rounds. Wall time (barrier-aligned) gives
tokens/s and the ratio; the process CPU time (summed over ranks) is printed too because it is
far less disturbed by other jobs. The load average is printed so readers can judge the noise.

    python benchmarks/archon_vs_fsdp.py [--size xs] [--rounds 12] [--batch 16] [--seq 128]
        [--pp-size xs] [--pp-layers 6] [--pp-microbatches 2 4 8] [--skip-pp] [--skip-compile]
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
    """RL-like batch: lengths ``seq, 7/8 seq, 6/8 seq, 5/8 seq`` repeating, right padded."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(batch):
        n = seq - (i % 4) * (seq // 8)
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        samples.append(Sample(ids, [0] * (n // 4) + [1] * (n - n // 4), [0.0] * n, [0] * n))
    b = collate(samples)
    b.advantages = torch.randn(b.input_ids.shape, generator=g)
    b.loss_weights = b.loss_mask / b.loss_mask.sum()
    return b


def loss_fn(logprobs, entropy, mb):
    return -(mb.advantages * logprobs * mb.loss_weights).sum(), {}


def engine_vocab() -> int:
    from areal_agents.models.tiny import VOCAB_SIZE

    return VOCAB_SIZE


def build(backend: str, opts: dict):
    """A fresh engine on ``tiny(opts['size'], seed=0)`` (identical weights for every side)."""
    from areal_agents.models import tiny

    hf, _ = tiny(opts["size"], seed=0, **opts.get("overrides", {}))
    kwargs = dict(lr=1e-4, token_budget=opts["budget"])
    if backend == "fsdp":
        from areal_agents.trainers.fsdp.engine import FSDPEngine

        return FSDPEngine(hf, **kwargs)
    from areal_agents.trainers.archon import ArchonEngine

    return ArchonEngine(hf, **kwargs, **opts.get("archon", {}))


def alternate(sides: dict[str, tuple[str, dict]], opts: dict, rounds: int, warmup: int = 2) -> dict:
    """Build every side, then step them in turn ``rounds`` times. Returns per side the wall
    seconds of each step and this process's CPU seconds of each step."""
    torch.manual_seed(0)
    batch = make_batch(engine_vocab(), opts["batch"], opts["seq"])
    engines = {name: build(backend, dict(opts, **extra)) for name, (backend, extra) in sides.items()}
    for engine in engines.values():
        for _ in range(warmup):  # compile / schedule shape inference happen here
            engine.train_step(batch, loss_fn)
    out = {name: {"wall": [], "cpu": []} for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            if dist.is_initialized():
                dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            engine.train_step(batch, loss_fn)
            if dist.is_initialized():
                dist.barrier()
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def _worker(rank: int, world: int, port: int, path: str, sides: dict, opts: dict, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = alternate(sides, opts, rounds)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, {k: v["cpu"] for k, v in res.items()})
        if rank == 0:  # CPU seconds summed over ranks, per step
            for name in res:
                res[name]["cpu"] = [sum(c) for c in zip(*(r[name] for r in per_rank), strict=True)]
                res[name]["cpu_ranks"] = [statistics.median(r[name]) for r in per_rank]
            torch.save(res, path)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo threads may abort in C++ teardown after the work is done


def distributed(sides: dict, opts: dict, rounds: int, world: int = 2) -> dict:
    """``alternate`` on ``world`` gloo processes (one thread each); rank 0's wall times."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(tempfile.mkdtemp(), "result.pt")
    mp.spawn(_worker, args=(world, port, path, sides, opts, rounds), nprocs=world, join=True)
    return torch.load(path, weights_only=False)


# -- PP accounting: what the schedules would take on dedicated cores ------------------------


def record_actions(engine) -> list[tuple[str, int, int, float]]:
    """Wrap the pipeline stages of ``engine`` so each compute action is logged as
    ``(kind, stage, micro-batch, thread CPU seconds)`` in execution order: ``F`` forward,
    ``B`` full backward, ``I`` input-gradient backward, ``W`` weight-gradient backward."""
    log: list[tuple[str, int, int, float]] = []
    for schedule in engine.pipeline._schedules.values():
        stages = getattr(schedule, "_stages", None) or [schedule._stage]
        for st in stages:
            def wrap(fn, kind, st=st):
                def timed(mb, *args, **kwargs):
                    k = kind if kind != "B" or kwargs.get("full_backward", True) else "I"
                    c0 = time.thread_time()
                    out = fn(mb, *args, **kwargs)
                    log.append((k, st.stage_index, mb, time.thread_time() - c0))
                    return out
                return timed
            st.forward_one_chunk = wrap(st.forward_one_chunk, "F")
            st.backward_one_chunk = wrap(st.backward_one_chunk, "B")
            st.backward_weight_one_chunk = wrap(st.backward_weight_one_chunk, "W")
    return log


def simulate(actions: list[list[tuple[str, int, int, float]]], owner: dict[int, int], latency: float) -> float:
    """Makespan of the ranks' recorded action sequences if every rank had its own core:
    each action starts when its rank is free and its inputs exist (``F(s,m)`` after
    ``F(s-1,m)``; ``B/I(s,m)`` after ``B/I(s+1,m)``; ``latency`` added across ranks)."""
    n_stages = max(s for acts in actions for _, s, _, _ in acts) + 1
    done: dict[tuple[str, int, int], float] = {}
    clock, pos = [0.0] * len(actions), [0] * len(actions)
    while any(pos[r] < len(actions[r]) for r in range(len(actions))):
        progressed = False
        for r, acts in enumerate(actions):
            while pos[r] < len(acts):
                kind, s, mb, dur = acts[pos[r]]
                if kind == "F":
                    dep = ("F", s - 1, mb) if s > 0 else None
                elif kind in ("B", "I"):
                    dep = ("G", s + 1, mb) if s < n_stages - 1 else ("F", s, mb)
                else:
                    dep = ("G", s, mb)
                if dep is not None and dep not in done:
                    break
                ready = done.get(dep, 0.0) + (latency if dep and owner[dep[1]] != r else 0.0)
                clock[r] = max(clock[r], ready) + dur
                done[("G" if kind in ("B", "I") else kind, s, mb)] = clock[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("recorded PP actions have a dependency cycle")
    return max(clock)


def _pp_account_worker(rank: int, world: int, port: int, path: str, sides: dict, opts: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch = make_batch(engine_vocab(), opts["batch"], opts["seq"])
        result = {}
        for name, (_, extra) in sides.items():
            engine = build("archon", dict(opts, **extra))
            for _ in range(2):
                engine.train_step(batch, loss_fn)
            log = record_actions(engine)
            engine.train_step(batch, loss_fn)
            logs: list = [None] * world
            dist.all_gather_object(logs, log)
            runner = engine.pipeline
            owner = {s: runner._owner(s) for s in range(runner.n_stages)}
            result[name] = (logs, owner)
        # one-way gloo latency of a micro-batch activation
        rows = -(-opts["batch"] // min(extra["archon"]["pp_microbatches"] for _, extra in sides.values()))
        h = torch.zeros(rows, opts["seq"], engine.args.dim)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            if rank == 0:
                dist.send(h, 1)
                dist.recv(h, 1)
            else:
                dist.recv(h, 0)
                dist.send(h, 0)
        latency = (time.perf_counter() - t0) / 20
        if rank == 0:
            torch.save((result, latency), path)
    finally:
        dist.destroy_process_group()
    os._exit(0)


def pp_account(sides: dict, opts: dict) -> None:
    """Print per-rank compute (thread CPU) of one step and the simulated dedicated-core step
    time of each schedule (ratio to the first side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(tempfile.mkdtemp(), "pp.pt")
    mp.spawn(_pp_account_worker, args=(2, port, path, sides, opts), nprocs=2, join=True)
    result, latency = torch.load(path, weights_only=False)
    print(f"  dedicated-core model (per-action thread CPU times of one step, gloo latency "
          f"{latency * 1e3:.2f} ms per hop):")
    base = None
    for name, (logs, owner) in result.items():
        span = simulate(logs, owner, latency)
        base = base or span
        per_rank = " + ".join(f"{sum(a[3] for a in acts) * 1e3:.0f}" for acts in logs)
        kinds = " ".join(f"{k}={sum(a[3] for acts in logs for a in acts if a[0] == k) * 1e3:.0f}"
                         for k in "FBIW" if any(a[0] == k for acts in logs for a in acts))
        print(f"    {name:<34} compute {per_rank} ms ({kinds})   simulated step "
              f"{span * 1e3:7.1f} ms   ratio {span / base:.2f}")


def report(title: str, res: dict, tokens: int, baseline: str, target: str, lower_is_better: bool) -> None:
    """Print every side (median wall ms, tokens/s, min wall, median CPU) and its ratio to
    ``baseline`` (tokens/s ratio, or step-time ratio when ``lower_is_better``)."""
    print(f"\n{title}   [load average {os.getloadavg()[0]:.1f}]")
    base_w = statistics.median(res[baseline]["wall"])
    base_c = statistics.median(res[baseline]["cpu"])
    for name, r in res.items():
        w, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
        ranks = ""
        if "cpu_ranks" in r:
            ranks = " (" + " + ".join(f"{x * 1e3:.0f}" for x in r["cpu_ranks"]) + ")"
        line = (f"  {name:<34} {w * 1e3:8.1f} ms/step (min {min(r['wall']) * 1e3:7.1f})  "
                f"{tokens / w:8.0f} tokens/s   cpu {c * 1e3:7.1f} ms{ranks}")
        if name != baseline:
            wr, cr = (w / base_w, c / base_c) if lower_is_better else (base_w / w, base_c / c)
            line += f"   ratio {wr:.2f} (cpu-time ratio {cr:.2f})"
        print(line)
    print(f"  target: {target}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="xs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12, help="alternating rounds (median reported)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile sides")
    p.add_argument("--skip-pp", action="store_true")
    p.add_argument("--only-pp", action="store_true")
    p.add_argument("--pp-size", default="xs")
    p.add_argument("--pp-layers", type=int, default=6)
    p.add_argument("--pp-microbatches", type=int, nargs="+", default=[2, 4, 8])
    a = p.parse_args()
    torch.set_num_threads(1)
    opts = dict(size=a.size, batch=a.batch, seq=a.seq, budget=a.batch * a.seq)
    batch = make_batch(engine_vocab(), a.batch, a.seq)
    tokens = batch.num_tokens
    print(f"tiny('{a.pp_size if a.only_pp else a.size}'), batch {a.batch} x <= {a.seq} tokens ({tokens} real of "
          f"{batch.input_ids.numel()} padded), median of {a.rounds} alternating rounds, "
          f"1 thread per process, {os.cpu_count()} CPUs")
    target = "Archon/FSDP tokens/s >= 1.2x"

    if not a.only_pp:
        sides = {"FSDPEngine": ("fsdp", {}), "ArchonEngine": ("archon", {})}
        if not a.skip_compile:
            sides["ArchonEngine compile=True"] = ("archon", {"archon": {"compile": True}})
        report("single process", alternate(sides, opts, a.rounds), tokens, "FSDPEngine", target, False)

        sides = {"FSDPEngine (FSDP2)": ("fsdp", {}), "ArchonEngine (FSDP2)": ("archon", {}),
                 "ArchonEngine reshard_after_fwd=False": ("archon", {"archon": {"reshard_after_forward": False}})}
        if not a.skip_compile:
            sides["ArchonEngine no-reshard + compile"] = (
                "archon", {"archon": {"reshard_after_forward": False, "compile": True}})
        report("2 processes (dp_shard=2, gloo)", distributed(sides, opts, a.rounds), tokens,
               "FSDPEngine (FSDP2)", target, False)
    if a.skip_pp:
        return
    # PP needs untied embeddings and >= 2 layers per rank for the 2-stages-per-rank schedules
    pp_opts = dict(opts, size=a.pp_size,
                   overrides={"num_hidden_layers": a.pp_layers, "tie_word_embeddings": False})
    pp_batch = make_batch(engine_vocab(), a.batch, a.seq)
    for m in a.pp_microbatches:
        sides = {f"1F1B, {m} micro-batches": ("archon", {"archon": {
                     "pp": 2, "pp_schedule": "1F1B", "pp_microbatches": m}}),
                 f"ZBVZeroBubble, {m} micro-batches": ("archon", {"archon": {
                     "pp": 2, "pp_schedule": "ZBVZeroBubble", "pp_microbatches": m}})}
        report(f"PP=2, tiny('{a.pp_size}') {a.pp_layers} layers untied, {m} micro-batches",
               distributed(sides, pp_opts, a.rounds), pp_batch.num_tokens, f"1F1B, {m} micro-batches",
               "ZBVZeroBubble/1F1B step time < 0.9", True)
        pp_account(sides, pp_opts)


if __name__ == "__main__":
    main()
