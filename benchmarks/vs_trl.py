"""This project's ``Trainer`` (GRPO) vs Hugging Face TRL's ``GRPOTrainer`` on one workload.

The workload is the Arithmetic example's (``examples/arithmetic/sft_then_rl.yaml``): one-digit
``a + b`` / ``a - b``, exact-match reward (1 for ``Answer: <n>`` right, else 0), the tiny model
after the example's SFT warm start. The SFT'd checkpoint is built once with the example's own
config and saved (``--ckpt``); every run starts from it. Matched settings on both sides:
8 prompts x 4 completions per step (one optimizer step on all 32, on-policy), lr 3e-4
constant (no warm-up), AdamW (0.9, 0.999), no weight decay, grad-norm clip 1.0, 6 new tokens,
temperature 1.0 (no top-k / top-p), PPO clip 0.2, no KL (no reference model), advantages
``(r - mean_g) / std_g`` (unbiased std), loss averaged over each sequence's tokens then over
sequences (ours ``seq-mean-token-mean``, TRL ``loss_type="grpo"``), gradient checkpointing
off, fp32, one torch thread, CPU.

Arms: ours sync (``max_staleness=0``), ours async (``max_staleness=1``), ours async with
training in a worker process (``train: {workers: true}``: the train step no longer shares the
controller's GIL with the engine and the episodes), the same with the controller pinned to the
first usable CPU and the worker to the last (``Trainer(cpus=)``, ``train: {cpus: [...]}``;
``ours_async_workers_pinned``), TRL. Each run is its
own subprocess (fresh allocator and thread pools); per seed both orders run (ours first, then
TRL first). Time per step is wall time between consecutive step ends (setup, model loading
and evaluation excluded); held-out accuracy is greedy exact match on the example's 200
``eval_seeds``, computed for every arm by the SAME function (``held_out_accuracy``: this
project's greedy evaluation of the saved final weights).

TRL is a benchmark-only dependency, never a test dependency; it lives in its own venv that
also holds this project (one process imports both)::

    python3.11 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0 trl==1.13.0 requests && .venv-trl/bin/pip install -e .
    OMP_NUM_THREADS=1 .venv-trl/bin/python benchmarks/vs_trl.py            # 200 steps, 3 seeds
    OMP_NUM_THREADS=1 .venv-trl/bin/python benchmarks/vs_trl.py --steps 30 --seeds 1 --orders ours
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --steps 30 --seeds 1 --orders ours \
        --arms ours_async_workers,ours_async_workers_pinned  # an A/B of ours only, no TRL
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --profile 10  # ours only, cProfile

Figures: README's benchmark table and ``docs/benchmarks_vs_trl.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: OpenMP reads it once

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "arithmetic" / "sft_then_rl.yaml"
ENV_ID, ENV_KWARGS, AGENT = "Arithmetic-v0", {"digits": 1, "operations": "+-"}, "agent"
NUM_PROMPTS, GROUP_SIZE, LR, MAX_TOKENS, TEMPERATURE, CLIP_EPS = 8, 4, 3e-4, 6, 1.0, 0.2
EVAL_SEEDS = list(range(2_000_000, 2_000_200))  # the example's held-out seeds
ARMS = {"ours_sync": 0, "ours_async": 1, "ours_async_workers": 1,
        "ours_async_workers_pinned": 1, "trl": None}  # arm -> our max_staleness
TRAIN_WORKERS = {"ours_async_workers", "ours_async_workers_pinned"}  # train in a worker process
PINNED = {"ours_async_workers_pinned"}  # controller on the first CPU, its train worker the last
OURS = ("ours_sync", "ours_async", "ours_async_workers", "ours_async_workers_pinned")
ORDERS = {"ours": (*OURS, "trl"), "trl": ("trl", *OURS)}
OUR_SPLIT = ("wait_rollout", "train", "weight_sync")


def _sampling() -> dict[str, Any]:
    return {"temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "stop": ["<|im_end|>"]}


def _cpus() -> tuple[list[int], list[int]]:
    """The pinned arm's CPUs: the controller's (the first usable one) and its train worker's
    (the last)."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        raise SystemExit("the pinned arm needs 2 usable CPUs; leave it out (--arms)")
    return usable[:1], usable[-1:]


def _policy(model: str, workers: bool = False, pinned: bool = False) -> Any:
    from areal_agents.trainers.policy import Policy

    train: dict[str, Any] = {"workers": True, "threads": 1} if workers else {}
    if pinned:
        train["cpus"] = _cpus()[1]
    return Policy(model=model, lr=LR, sampling=_sampling(), api="completions", train=train)


def _trainer(model: str, seed: int, max_staleness: int, logger: Any = None,
             workers: bool = False, pinned: bool = False) -> Any:
    from areal_agents.algorithms import GRPO
    from areal_agents.trainers.trainer import Trainer

    return Trainer(env=ENV_ID, env_kwargs=dict(ENV_KWARGS),
                   policies={"solver": _policy(model, workers, pinned)},
                   policy_map={AGENT: "solver"}, algorithm=GRPO(clip_eps=CLIP_EPS),
                   batch_size=NUM_PROMPTS * GROUP_SIZE, group_size=GROUP_SIZE,
                   max_staleness=max_staleness, seed=seed, progress=False, torch_threads=1,
                   logger=logger, cpus=_cpus()[0] if pinned else None,
                   # Arithmetic ends after one step anyway; a limit of 1 also tells the engine
                   # no session has a follow-up (no prefix-cache copy of finished rows)
                   max_steps_per_episode=1)


def build_checkpoint(path: Path) -> None:
    """SFT the tiny model with the example's config (its warm start only) and save it."""
    from areal_agents.config import load_config

    cfg = load_config(EXAMPLE, [f"run_dir={path / 'sft_run'}", "logging.progress=false",
                                "logging.tensorboard=false"])
    trainer = cfg.build()

    async def run() -> None:
        await trainer.setup()  # builds the model and runs the SFT warm start
        (name,) = trainer.train_engines
        trainer.train_engines[name].model.save_pretrained(path)
        trainer.tokenizers[name].save_pretrained(path)
        await trainer.aclose()

    asyncio.run(run())


def held_out_accuracy(model_dir: Path) -> float:
    """Greedy exact-match accuracy of the weights in ``model_dir`` on ``EVAL_SEEDS`` (the same
    code for every arm: this project's greedy evaluation, a fresh in-process engine)."""
    trainer = _trainer(str(model_dir), seed=0, max_staleness=0)

    async def run() -> float:
        try:
            return (await trainer.evaluate(EVAL_SEEDS))[f"eval/{AGENT}/success"]
        finally:
            await trainer.aclose()

    return asyncio.run(run())


class _StepClock:
    """A metrics sink that stamps the wall time of every logged step (ours logs once a step)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def log(self, step: int, metrics: Any) -> None:
        if step > 0:
            self.stamps.append(time.perf_counter())

    def close(self) -> None:
        pass


def _children_cpu() -> float:
    """CPU seconds of this process's live child processes so far (a train worker's; Linux
    ``/proc``, 0 elsewhere)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(stat[11]) + int(stat[12])) / tick  # utime + stime
    return total


def run_ours(ckpt: Path, out: Path, seed: int, steps: int, max_staleness: int,
             workers: bool = False, pinned: bool = False) -> dict[str, Any]:
    """Train ``steps`` steps from ``ckpt``; save the final weights to ``out``; step times and
    the medians of where a step went (the Trainer's ``time/*`` metrics)."""
    clock = _StepClock()
    trainer = _trainer(str(ckpt), seed, max_staleness, logger=clock, workers=workers,
                       pinned=pinned)

    async def run() -> dict[str, Any]:
        try:
            await trainer.setup()
            start, cpu_start = time.perf_counter(), time.process_time()
            workers_start = _children_cpu()
            history = await trainer.afit(steps)
            cpu = time.process_time() - cpu_start  # this process only
            worker_cpu = _children_cpu() - workers_start  # a train worker's
            (name,) = trainer.train_engines
            # the served weights: the trained ones after each step's push, also when a worker
            # process trains
            trainer.gateway.policies[name].router.engines[0].model.save_pretrained(out)
            trainer.tokenizers[name].save_pretrained(out)
        finally:
            await trainer.aclose()
        split = {k: statistics.median(h[f"policy/solver/time/{k}"] for h in history)
                 for k in OUR_SPLIT}
        def mean_of(key: str) -> float | None:  # over the steps that logged it
            values = [h[key] for h in history if key in h]
            return statistics.fmean(values) if values else None

        return {"start": start, "stamps": clock.stamps, "split": split,
                "cpu_s": cpu + worker_cpu, "worker_cpu_s": worker_cpu,
                "prox_skipped": mean_of("policy/solver/prox_recompute_skipped"),
                "prox_in_forward": mean_of("policy/solver/prox_from_train_forward"),
                "train_reward": statistics.fmean(h["policy/solver/reward"] for h in history)}

    return asyncio.run(run())


def profile_ours(ckpt: Path, steps: int, top: int = 25, dump: Path | None = None,
                 arm: str = "ours_sync") -> None:
    """cProfile ``steps`` steps of ``arm`` of ours (after setup) in this process: the event
    loop's thread (episodes, gateway, SDK) and the train thread (``asyncio.to_thread``), by
    cumulative and by own time (a train worker's process is not profiled: its calls show as
    waits). Needs no TRL."""
    import cProfile
    import pstats
    import threading

    trainer = _trainer(str(ckpt), seed=0, max_staleness=ARMS[arm] or 0,
                       workers=arm in TRAIN_WORKERS, pinned=arm in PINNED)
    profiles: list[cProfile.Profile] = []

    def per_thread(*_: Any) -> None:  # threading.setprofile hook: one profile per new thread
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()

    async def run() -> None:
        try:
            await trainer.setup()
            loop = cProfile.Profile()
            profiles.append(loop)
            threading.setprofile(per_thread)
            loop.enable()
            await trainer.afit(steps)
            loop.disable()
        finally:
            threading.setprofile(None)
            for prof in profiles:
                prof.disable()
            await trainer.aclose()

    start = time.perf_counter()
    asyncio.run(run())
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s (with setup); load {_load()}")
    stats = pstats.Stats(profiles[0])
    for prof in profiles[1:]:
        stats.add(prof)
    if dump is not None:
        stats.dump_stats(dump)  # for pstats / snakeviz
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def _task(seed: int) -> dict[str, Any]:
    """The prompt text our completions API sends for task ``seed``, and its answer."""
    from areal_agents.registration import make
    from areal_agents.trainers.llm_session import raw_prompt

    env = make(ENV_ID, **ENV_KWARGS)
    observation, info = asyncio.run(env.reset(seed=seed))
    return {"prompt": raw_prompt(observation), "task_seed": seed, "answer": info["answer"]}


def run_trl(ckpt: Path, out: Path, seed: int, steps: int) -> dict[str, Any]:
    """TRL's ``GRPOTrainer`` from ``ckpt`` on the same tasks (task seeds counting up from
    ``seed``, as ours) and the env's own reward; saves the final weights to ``out``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from areal_agents.registration import make

    rows = [_task(s) for s in range(seed, seed + NUM_PROMPTS * steps)]
    dataset = Dataset.from_list(rows)

    def reward(completions: list[str], task_seed: list[int], **_: Any) -> list[float]:
        async def one(text: str, task: int) -> float:  # the env scores it, as in our episodes
            env = make(ENV_ID, **ENV_KWARGS)
            await env.reset(seed=task)
            return float((await env.step(text))[1])

        async def all_() -> list[float]:
            return list(await asyncio.gather(*(one(c, s) for c, s in
                                               zip(completions, task_seed, strict=True))))

        return asyncio.run(all_())

    class Clock(TrainerCallback):
        start, stamps, cpu_start, cpu = 0.0, [], 0.0, 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            Clock.start, Clock.cpu_start = time.perf_counter(), time.process_time()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            Clock.cpu = time.process_time() - Clock.cpu_start

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            Clock.stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out / "trl_out"), seed=seed, max_steps=steps, use_cpu=True,
        per_device_train_batch_size=NUM_PROMPTS * GROUP_SIZE, num_generations=GROUP_SIZE,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, max_completion_length=MAX_TOKENS,
        temperature=TEMPERATURE, top_p=1.0, top_k=0, epsilon=CLIP_EPS, beta=0.0,
        loss_type="grpo", scale_rewards="group", gradient_checkpointing=False, bf16=False,
        fp16=False, report_to="none", logging_steps=max(1, steps // 10), save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, use_vllm=False, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"start": Clock.start, "stamps": Clock.stamps, "split": None, "cpu_s": Clock.cpu,
            "prox_skipped": None,
            "prox_in_forward": None,
            "train_reward": statistics.fmean(rewards) if rewards else float("nan")}


def run_arm(arm: str, ckpt: Path, seed: int, steps: int) -> dict[str, Any]:
    """One run of ``arm`` in this process: step times, where ours went, held-out accuracy."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=f"vs_trl_{arm}_") as tmp:
        out = Path(tmp)
        if ARMS[arm] is None:
            result = run_trl(ckpt, out, seed, steps)
        else:
            result = run_ours(ckpt, out, seed, steps, ARMS[arm], arm in TRAIN_WORKERS,
                              arm in PINNED)
        accuracy = held_out_accuracy(out)
    start, stamps = result.pop("start"), result.pop("stamps")
    if len(stamps) != steps:
        raise RuntimeError(f"{arm}: {len(stamps)} step stamps for {steps} steps")
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    return {"arm": arm, "seed": seed, "step_times": times, "accuracy": accuracy, **result}


def _spawn(arm: str, ckpt: Path, seed: int, steps: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, __file__, "--arm", arm, "--ckpt", str(ckpt), "--steps",
               str(steps), "--seed-of-arm", str(seed), "--result", result.name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:  # the child's log is shown only when it failed
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
            raise RuntimeError(f"the {arm} run (seed {seed}) exited with {done.returncode}")
        return json.loads(Path(result.name).read_text())


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def report(runs: list[dict[str, Any]], steps: int) -> None:
    """Per arm: median step time, total time, held-out accuracy; ratios to TRL; our split."""
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in ARMS}
    med = {a: statistics.median(statistics.median(r["step_times"]) for r in rs)
           for a, rs in by_arm.items() if rs}
    total = {a: statistics.median(sum(r["step_times"]) for r in rs)
             for a, rs in by_arm.items() if rs}
    runs_per_arm = max(len(rs) for rs in by_arm.values())
    print(f"\n{steps} steps x {NUM_PROMPTS * GROUP_SIZE} samples; medians over {runs_per_arm} "
          f"run(s) per arm; accuracy = greedy exact match on {len(EVAL_SEEDS)} held-out seeds "
          f"(mean over runs, each run's value in brackets)")
    for arm, rs in by_arm.items():
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        line = (f"  {arm:10s} step {1e3 * med[arm]:6.0f} ms (median)  total {total[arm]:6.1f} s"
                f"  accuracy {statistics.fmean(accs):.3f} "
                f"[{', '.join(f'{a:.3f}' for a in accs)}]"
                f"  train reward {statistics.fmean(r['train_reward'] for r in rs):.3f}")
        if arm != "trl" and "trl" in med:
            line += (f"  ours/TRL: step {med[arm] / med['trl']:.2f}x, "
                     f"total {total[arm] / total['trl']:.2f}x")
        print(line)
    for arm in OURS:
        if not by_arm[arm]:
            continue
        split = {k: statistics.median(r["split"][k] for r in by_arm[arm]) for k in OUR_SPLIT}
        other = med[arm] - sum(split.values())
        skipped = [r["prox_skipped"] for r in by_arm[arm] if r["prox_skipped"] is not None]
        fused = [r["prox_in_forward"] for r in by_arm[arm] if r.get("prox_in_forward") is not None]
        prox = (f"; proximal log-probs: the behaviour ones on {statistics.fmean(skipped):.0%} of "
                f"steps, from the train forward (no extra pass) on "
                f"{statistics.fmean(fused) if fused else 0.0:.0%}" if skipped else "")
        print(f"  where a step of {arm} goes (medians of the Trainer's time/* metrics): "
              + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in split.items())
              + f", the rest of the median step (metrics, logging, bookkeeping) "
              f"~{1e3 * other:.0f} ms{prox}")
    cores = os.cpu_count() or 1
    cpu = {a: statistics.median(r["cpu_s"] / steps for r in rs)
           for a, rs in by_arm.items() if rs and all("cpu_s" in r for r in rs)}
    if cpu:
        print("  CPU per step (the run's processes, a train worker included, all threads; "
              "median): "
              + ", ".join(f"{a} {1e3 * v:.0f} ms" for a, v in cpu.items())
              + f"; on {cores} cores no arm's step can take less than its CPU / {cores}"
              + "".join(f"; {a} / TRL >= {cpu[a] / cores / med['trl']:.2f} here"
                        for a in ("ours_async", *sorted(TRAIN_WORKERS))
                        if a in cpu and "trl" in med))
    for arm in TRAIN_WORKERS & cpu.keys():
        worker = statistics.median(r["worker_cpu_s"] / steps for r in by_arm[arm])
        controller = statistics.median((r["cpu_s"] - r["worker_cpu_s"]) / steps
                                       for r in by_arm[arm])
        print(f"  {arm}: controller process {1e3 * controller:.0f} ms + train worker "
              f"{1e3 * worker:.0f} ms CPU per step (medians): its step cannot take less than "
              f"the larger"
              + (f" ({max(controller, worker) / med['trl']:.2f}x TRL here)" if "trl" in med
                 else ""))
    targets = {"ours_sync": 0.8, "ours_async": 0.5, "ours_async_workers": 0.5,
               "ours_async_workers_pinned": 0.5}
    for arm, target in targets.items():
        if arm in med and "trl" in med:
            ratio = med[arm] / med["trl"]
            print(f"  target {arm} / TRL step time <= {target}: "
                  f"{'met' if ratio <= target else 'NOT met'} ({ratio:.2f})")


def caveats(orders: list[str]) -> str:
    return (f"caveats: {os.cpu_count()} cores, load average (1, 5, 15 min) {_load()} (a shared "
            f"machine: compare ratios, not absolute times); OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS')}, one torch thread per run; orders run: "
            f"{', '.join(orders)} first. Not matched: generation (ours: batched LocalEngine "
            f"behind the in-process gateway; TRL: transformers generate), prompt order (TRL "
            f"shuffles the same task pool), std eps (ours 1e-6, TRL 1e-4), sampling RNG streams; "
            f"TRL's step includes its metric gathering, ours its episode bookkeeping")


def _arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="train steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (each runs every arm)")
    parser.add_argument("--orders", choices=("both", "ours", "trl"), default="both",
                        help="which goes first in a seed's runs: both orders, or one")
    parser.add_argument("--arms", type=_arms, default=tuple(ARMS), metavar="A,B",
                        help=f"the arms to run, comma-separated (default all: "
                        f"{','.join(ARMS)}; they run in the --orders order); without trl: "
                        f"no ratios, and no TRL needed")
    parser.add_argument("--ckpt", type=Path, default=REPO / "runs" / "vs_trl" / "sft",
                        help="the SFT'd checkpoint (built once when missing)")
    parser.add_argument("--profile", type=int, metavar="STEPS", default=0,
                        help="only cProfile STEPS steps of ours (no TRL needed)")
    parser.add_argument("--profile-arm", choices=OURS, default="ours_sync",
                        help="the arm --profile runs")
    parser.add_argument("--arm", choices=tuple(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--seed-of-arm", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # a child run
        args.result.write_text(json.dumps(run_arm(args.arm, args.ckpt, args.seed_of_arm,
                                                  args.steps)))
        return
    if args.profile:
        if not (args.ckpt / "config.json").exists():
            build_checkpoint(args.ckpt)
        profile_ours(args.ckpt, args.profile, dump=Path(tempfile.gettempdir()) / "vs_trl.prof",
                     arm=args.profile_arm)
        return
    trl_version = "not run"
    try:
        if "trl" in args.arms:
            import trl

            trl_version = trl.__version__
    except ImportError:
        sys.exit("vs_trl.py needs TRL, a benchmark-only dependency: run it with "
                 ".venv-trl/bin/python (see this file's docstring for how to build that venv)")
    if not (args.ckpt / "config.json").exists():
        print(f"building the SFT'd checkpoint at {args.ckpt} (the example's warm start) ...")
        build_checkpoint(args.ckpt)
    print(f"TRL {trl_version}; before: load average {_load()}")
    sft = held_out_accuracy(args.ckpt)
    print(f"SFT'd checkpoint (step 0): held-out accuracy {sft:.3f}")
    orders = ["ours", "trl"] if args.orders == "both" else [args.orders]
    runs = []
    for seed in range(args.seeds):
        for order in orders:
            for arm in (a for a in ORDERS[order] if a in args.arms):
                runs.append(_spawn(arm, args.ckpt, seed, args.steps))
                r = runs[-1]
                print(f"  seed {seed}, {order} first: {arm:10s} median step "
                      f"{1e3 * statistics.median(r['step_times']):.0f} ms, total "
                      f"{sum(r['step_times']):.1f} s, accuracy {r['accuracy']:.3f}; load {_load()}",
                      flush=True)
    report(runs, args.steps)
    print(caveats(orders))


if __name__ == "__main__":
    main()
