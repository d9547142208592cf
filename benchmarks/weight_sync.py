"""Weight sync, measured against raw copies of the same bytes in the same run.

Part ``transports`` (issue 12): a Qwen3-0.6B-shaped state (hidden 1024, 28 layers, 16 heads /
8 KV heads of dim 128, intermediate 3072, vocab 151936, tied embeddings; random bf16 tensors,
no download; ~1.19 GB) pushed through each transport into a preallocated copy of the state
(the receiver copies each tensor as it arrives, as a streaming engine does):

* ``tensor`` (in process, zero copy), ``shm`` (one shared-memory block, bucket by bucket;
  the receiver yields copies) and ``shm view`` (the receiver yields views into the block,
  ``borrow=True``) against a raw ``target[name].copy_(source[name])`` loop;
* ``disk`` (sharded safetensors dir written, then read back) against writing the same bytes
  to one raw file and reading them back (both through the page cache; no fsync);
* ``gloo`` (two CPU processes: the ``transport: gloo`` path of engine servers, a JSON message
  and one broadcast per bucket) against the sender copying the same tensors in its process;
  the peak extra memory is the receiver's resident set;
* ``nccl`` (the same code, ``cuda:0`` -> ``cuda:1``) against rank 0 copying the same tensors
  to ``cuda:1``; it needs two CUDA devices and is printed as skipped without them.

Each row prints seconds, GB/s, the ratio transport / raw, and the peak extra memory of the
push (resident-set samples every ~1 ms, minus the level before it) against the bound of two
buckets. Part ``models``: ``push_local(LocalEngine, FSDPEngine.export_weights())`` vs a raw
``copy_`` for Qwen3 models of ~1M, 10M and 50M parameters (target <= 2x).

Run: ``OMP_NUM_THREADS=2 python benchmarks/weight_sync.py [--part transports|models|all]
[--repeats 3] [--bucket-mb 320]`` (the bucket must hold the 297 MiB embedding for shm).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from areal_agents.engines.base import WeightUpdate
from areal_agents.engines.local import LocalEngine
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.weight_shm import SharedMemoryTransport
from areal_agents.trainers.weight_sync import push_local, save_safetensors_dir
from areal_agents.trainers.weight_transport import DiskTransport, TensorTransport, receive

QWEN3_0_6B = {"hidden": 1024, "layers": 28, "heads": 16, "kv_heads": 8, "head_dim": 128,
              "intermediate": 3072, "vocab": 151936}


def qwen3_shapes(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of a Qwen3 causal LM with tied embeddings (no ``lm_head``)."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                (p + "self_attn.q_norm.weight", (head_dim,)),
                (p + "self_attn.k_norm.weight", (head_dim,)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
    return [*out, ("model.norm.weight", (hidden,))]


def random_state(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set every ~1 ms in a thread; ``extra`` = peak - level at entry."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.base


def push(transport: object, source: dict[str, torch.Tensor],
         target: dict[str, torch.Tensor], borrow: bool = False) -> None:
    """Send in a thread (disk: first), receive here, copying each tensor into ``target``."""
    manifest = transport.manifest()  # type: ignore[attr-defined]
    sender = threading.Thread(target=transport.send, args=(iter(source.items()),))  # type: ignore[attr-defined]
    sender.start()
    if manifest["kind"] == "disk":
        sender.join()
    for name, tensor in receive(manifest, borrow=borrow):
        target[name].copy_(tensor)
        del tensor
    sender.join()


def raw_copy(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    for name, tensor in source.items():
        target[name].copy_(tensor)


def raw_file(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> None:
    """Write every tensor's bytes to one file, then read them back into ``target``."""
    with open(path, "wb") as fh:
        for tensor in source.values():
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    with open(path, "rb") as fh:
        for name in source:
            fh.readinto(target[name].reshape(-1).view(torch.uint8).numpy().data)


def best_of(repeats: int, fns: Iterable[Callable[[], object]]) -> list[float]:
    """Best time of each fn over ``repeats`` interleaved rounds (fair on a shared machine)."""
    fns = list(fns)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def bench_transports(repeats: int, bucket_bytes: int) -> None:
    source = random_state(qwen3_shapes(**QWEN3_0_6B))
    target = {n: torch.zeros_like(t) for n, t in source.items()}  # touched: no first-touch faults
    total = sum(t.numel() * t.element_size() for t in source.values())
    largest = max(t.numel() * t.element_size() for t in source.values())
    print(f"state: Qwen3-0.6B shapes, {sum(t.numel() for t in source.values()):,} bf16 params, "
          f"{total / 1e9:.3f} GB; bucket {bucket_bytes / 2**20:.0f} MiB (largest tensor "
          f"{largest / 2**20:.0f} MiB); load {os.getloadavg()[0]:.2f}, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        shm = SharedMemoryTransport(bucket_bytes)
        rows = {
            "tensor": (lambda: push(TensorTransport(bucket_bytes), source, target), "raw copy_"),
            "shm": (lambda: push(shm, source, target), "raw copy_"),
            "shm view": (lambda: push(shm, source, target, borrow=True), "raw copy_"),
            "disk": (lambda: push(DiskTransport(f"{tmp}/w", bucket_bytes), source, target),
                     "raw file"),
        }
        t_copy, t_file, *t_rows = best_of(
            repeats, [lambda: raw_copy(source, target),
                      lambda: raw_file(source, target, f"{tmp}/raw.bin")]
            + [fn for fn, _ in rows.values()])
        print(f"{'transport':>9} {'s':>7} {'GB/s':>6} {'raw':>9} {'raw s':>7} {'raw GB/s':>8} "
              f"{'ratio':>6} {'peak extra MiB':>14} {'<= 2 buckets':>12}")
        for (kind, (fn, raw_name)), t in zip(rows.items(), t_rows, strict=True):
            for v in target.values():
                v.zero_()
            with PeakRSS() as mem:
                fn()
            for name, tensor in source.items():  # the push really landed
                assert torch.equal(target[name], tensor), (kind, name)
            raw = t_copy if raw_name == "raw copy_" else t_file
            print(f"{kind:>9} {t:>7.3f} {total / t / 1e9:>6.2f} {raw_name:>9} {raw:>7.3f} "
                  f"{total / raw / 1e9:>8.2f} {t / raw:>5.2f}x {mem.extra / 2**20:>14.0f} "
                  f"{mem.extra <= 2 * bucket_bytes!s:>12}")
        shm.close()
    bench_group("gloo", repeats, bucket_bytes)  # transport: gloo (engine servers on CPU)
    if torch.cuda.device_count() >= 2:
        bench_group("nccl", repeats, bucket_bytes)
    else:
        print(f"     nccl skipped: needs 2 CUDA devices ({torch.cuda.device_count()} here)")


def bench_group(backend: str, repeats: int, bucket_bytes: int,
                spec: dict[str, int] | None = None) -> None:
    """``NCCLTransport`` between two processes (``cuda:0`` -> ``cuda:1`` on NCCL; CPU on gloo)
    vs rank 0 copying the same tensors to the other device (``copy_``)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_group_worker, args=(f"{tmp}/init", backend, repeats, bucket_bytes, tmp,
                                      spec or QWEN3_0_6B), nprocs=2)
        sender = torch.load(f"{tmp}/rank0.pt")
        receiver = torch.load(f"{tmp}/rank1.pt")
    t, raw, total = min(receiver["times"]), min(sender["raw"]), sender["total"]
    assert receiver["equal"], "the received state differs from the sent one"
    extra = receiver.get("extra")
    memory = f"{extra / 2**20:>14.0f} {extra <= 2 * bucket_bytes!s:>12}" if extra else "-"
    name = "nccl" if backend == "nccl" else "gloo"
    print(f"{name:>9} {t:>7.3f} {total / t / 1e9:>6.2f} {'raw copy_':>9} {raw:>7.3f} "
          f"{total / raw / 1e9:>8.2f} {t / raw:>5.2f}x {memory}")


def _group_worker(rank: int, init_file: str, backend: str, repeats: int, bucket_bytes: int,
                  out_dir: str, spec: dict[str, int]) -> None:
    import torch.distributed as dist

    from areal_agents.trainers.weight_nccl import NCCLTransport

    cuda = backend == "nccl"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    state = {n: t.to(device) for n, t in random_state(qwen3_shapes(**spec)).items()}
    target = {n: torch.zeros_like(t) for n, t in state.items()}  # touched: not counted below
    transport = NCCLTransport(src=0, bucket_bytes=bucket_bytes, device=device)
    log: dict[str, object] = {"times": [], "raw": [],
                              "total": sum(t.numel() * t.element_size() for t in state.values())}
    for _ in range(repeats):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        dist.barrier()
        start = time.perf_counter()
        with PeakRSS() as mem:
            if rank == 0:
                transport.send(state.items())
            else:
                for name, tensor in transport.receive():
                    target[name].copy_(tensor)
                    del tensor
            sync()
        log["times"].append(time.perf_counter() - start)  # type: ignore[union-attr]
        if rank == 1:  # the receiver's extra memory (device memory on CUDA, else resident)
            log["extra"] = (torch.cuda.max_memory_allocated() - before if cuda
                            else max(int(log.get("extra", 0)), mem.extra))  # type: ignore[call-overload]
    if rank == 0:  # the raw baseline: the same bytes copied to the other device
        other = {n: torch.zeros_like(t, device="cuda:1" if cuda else "cpu")
                 for n, t in state.items()}
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for name, tensor in state.items():
                other[name].copy_(tensor)
            sync()
            log["raw"].append(time.perf_counter() - start)  # type: ignore[union-attr]
    else:
        log["equal"] = all(torch.equal(target[n], state[n]) for n in state)
    torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


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

        t_raw, _ = best_of(repeats, [raw, sync])
        t_sync = min(pushes)
        (t_disk,) = best_of(2, [disk])
    loop.run_until_complete(engine.close())
    loop.close()
    for k, v in engine.model.state_dict().items():  # the push really landed
        if k in source:
            assert torch.equal(v, source[k]), k
    return sum(p.numel() for p in trainer.model.parameters()), t_raw, t_sync, t_disk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["transports", "models", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=320)
    ap.add_argument("--sizes", default="1M,10M,50M")
    args = ap.parse_args()
    if args.part in ("transports", "all"):
        bench_transports(args.repeats, args.bucket_mb * 2**20)
    if args.part in ("models", "all"):
        bench_models(args.sizes.split(","), args.repeats)


def bench_models(sizes: list[str], repeats: int) -> None:
    print(f"{'model':>6} {'params':>12} {'raw copy_ ms':>13} {'export+load ms':>15} {'ratio':>7} "
          f"{'via disk ms':>12}")
    for name in sizes:
        num_params, t_raw, t_sync, t_disk = measure(name, repeats)
        print(f"{name:>6} {num_params:>12,} {t_raw * 1e3:>13.3f} {t_sync * 1e3:>15.3f} "
              f"{t_sync / t_raw:>6.2f}x {t_disk * 1e3:>12.1f}")
    print("target: export+load / raw <= 2x")


if __name__ == "__main__":
    main()
