"""FSDPEngine.train_step against a bare PyTorch loop, and chunked vs full log-prob memory.

1. Throughput: the same model (Qwen3, random init), the same batch and the same AdamW take
   ``--steps`` optimizer steps through ``FSDPEngine.train_step`` (single process, chunked
   log-probs, one micro-batch) and through a bare loop (HF forward -> full log-softmax ->
   PPO-clip loss -> backward -> clip -> AdamW). Prints tokens/s of both and the time ratio
   engine / bare (target <= 1.05x). Caveat: the engine pushes only the loss-mask tokens
   (3/4 of the positions here) through the LM head, as a trainer does; the bare loop, like a
   plain HF training loop, projects every position.
2. Memory: forward + backward of token log-probs and entropy for a 32k-vocab LM head, once
   with the full ``[tokens, vocab]`` log-softmax and once chunked (``trainers/logprobs.py``),
   each in a fresh subprocess; peak resident-memory growth over the inputs, sampled from
   ``/proc/self/statm`` every 0.5 ms with glibc returning large blocks to the OS
   (``MALLOC_MMAP_THRESHOLD_``), so the figure tracks live tensors. Prints both and the ratio
   full / chunked (target >= 3x).

Run: ``OMP_NUM_THREADS=2 python benchmarks/train_step.py [--steps 5] [--seq 128] [--batch 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from areal_agents.samples import TokenBatch
from areal_agents.trainers.fsdp import FSDPEngine
from areal_agents.trainers.logprobs import chunked_logprobs


def build_model(vocab: int, hidden: int, layers: int, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32,
                      num_key_value_heads=max(1, hidden // 64), head_dim=32,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).float()


def build_batch(batch: int, seq: int, vocab: int) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    loss_mask = torch.zeros(batch, seq)
    loss_mask[:, seq // 4 :] = 1.0
    old = -torch.rand(batch, seq, generator=g) * loss_mask
    return TokenBatch(ids, mask, loss_mask, old, torch.zeros(batch, seq, dtype=torch.long),
                      torch.zeros(batch), advantages=torch.randn(batch, 1, generator=g) * loss_mask,
                      loss_weights=loss_mask / loss_mask.sum())


def ppo_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch):
    ratio = torch.exp((logprobs - mb.old_logprobs) * mb.loss_mask)
    per_token = -torch.minimum(ratio * mb.advantages, ratio.clamp(0.8, 1.2) * mb.advantages)
    return (per_token * mb.loss_weights).sum(), {}


def bare_step(model: torch.nn.Module, batch: TokenBatch):
    """One plain PyTorch PPO step as a closure (same loss, clip and AdamW as the engine)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as FSDPEngine's

    def one() -> None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        logp_all = torch.log_softmax(logits.float(), -1)[:, :-1]
        lp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)
        ratio = torch.exp((lp - batch.old_logprobs) * batch.loss_mask)
        adv = batch.advantages
        loss = (-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * batch.loss_weights).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return one


def timed_alternating(steps: int, *fns) -> list[float]:
    """Median seconds per call of each fn, calls interleaved (fair on a shared machine)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def memory_child(mode: str, tokens: int, hidden: int, vocab: int, chunk: int) -> None:
    """Runs in a subprocess: prints peak RSS growth (MiB) of one forward+backward."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if mode == "full":
        logp_all = torch.log_softmax(h @ w.t(), -1)
        lp = logp_all.gather(-1, y[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    else:
        lp, ent = chunked_logprobs(h, w, y, 1.0, chunk)
    (lp.sum() + 0.01 * ent.sum()).backward()
    peak[0] = max(peak[0], rss())
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": (peak[0] - base) / 2**20}))


def measure_memory(mode: str, tokens: int, hidden: int, vocab: int, chunk: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", mode, str(tokens), str(hidden),
                          str(vocab), str(chunk)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--mem-tokens", type=int, default=2048)
    ap.add_argument("--mem-vocab", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--memory-child", nargs=5, metavar=("MODE", "T", "H", "V", "C"))
    args = ap.parse_args()
    if args.memory_child:
        mode, *nums = args.memory_child
        memory_child(mode, *map(int, nums))
        return

    batch = build_batch(args.batch, args.seq, args.vocab)
    tokens = batch.num_tokens
    bare_fn = bare_step(build_model(args.vocab, args.hidden, args.layers), batch)
    engine = FSDPEngine(build_model(args.vocab, args.hidden, args.layers), lr=1e-5,
                        token_budget=batch.input_ids.numel())
    bare, eng = timed_alternating(args.steps, bare_fn, lambda: engine.train_step(batch, ppo_loss))
    print(f"train step ({args.batch}x{args.seq} tokens, {args.layers}x{args.hidden} model, "
          f"vocab {args.vocab}, {torch.get_num_threads()} threads)")
    print(f"  bare PyTorch loop : {tokens / bare:10.0f} tokens/s ({bare:.3f} s/step, median)")
    print(f"  FSDPEngine        : {tokens / eng:10.0f} tokens/s ({eng:.3f} s/step, median)")
    print(f"  time ratio engine/bare: {eng / bare:.3f}x (target <= 1.05x; the engine's LM head "
          f"runs on the loss-mask tokens only)")

    full = measure_memory("full", args.mem_tokens, args.hidden, args.mem_vocab, args.chunk)
    chunked = measure_memory("chunked", args.mem_tokens, args.hidden, args.mem_vocab, args.chunk)
    print(f"log-prob fwd+bwd peak memory ({args.mem_tokens} tokens, vocab {args.mem_vocab}, "
          f"chunk {args.chunk})")
    print(f"  full log-softmax  : {full:8.1f} MiB")
    print(f"  chunked           : {chunked:8.1f} MiB")
    print(f"  ratio full/chunked: {full / max(chunked, 1e-9):.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
