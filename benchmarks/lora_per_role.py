"""Separate full models per role vs one base + one LoRA adapter per role, on Signaling-v0.

Runs ``examples/signaling/two_llms.yaml`` (two full tiny models, full fine-tuning) and
``examples/signaling/lora_per_role.yaml`` (one base, an adapter per role) for the same number
of steps, each arm in its own process (so the peak RSS is its own), and prints both sides and
the ratio (adapters / separate) of:

* train-side bytes: parameters, gradients and optimizer states of every train engine, each
  storage counted once (the shared base once);
* serving-side bytes: parameters of every served model, plus the adapters' tensors;
* the process's peak resident memory (``ru_maxrss``; mostly torch itself at tiny sizes);
* step time: wall time of ``fit`` after setup, per step; the process's CPU time (user +
  system, all threads) per step, less distorted by other jobs on a loaded machine; and the
  trainers' own ``time/train`` per step;
* success: greedy eval success of both agents at the last eval, and the mean sampled
  success over the last 10 steps.

    python benchmarks/lora_per_role.py [--steps 50] [--model tiny:xs] [--out result.json]
    python benchmarks/lora_per_role.py --arm adapters --set policies.speaker.lr=5e-3 --out a.json
    python benchmarks/lora_per_role.py --combine separate.json a.json

``--set`` takes any override of the arm's YAML, e.g. ``'trainer.warm_start.shares={speaker: 2,
listener: 1}'`` (each role's share of the shared warm start's batches). ``--model`` takes a
checkpoint path too (e.g. an untied tiny model written by
``areal_agents.models.save_tiny(path, "xs", tie_word_embeddings=False)``), for both arms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"separate": ROOT / "examples/signaling/two_llms.yaml",
        "adapters": ROOT / "examples/signaling/lora_per_role.yaml"}


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def train_bytes(trainer) -> int:
    tensors = []
    engines = {id(e): e for e in trainer.train_engines.values()}
    for engine in engines.values():
        base = getattr(engine, "base", None)
        inner = base.engine if base is not None else engine  # an adapter view: the shared engine
        model = getattr(inner, "model", None)
        for p in model.parameters():
            tensors += [p, p.grad]
        optimizers = [getattr(inner, "optimizer", None)]
        if base is not None:
            optimizers += [v.optimizer for v in base.views.values()]
            tensors += [t for v in base.views.values() for t in v.values.values()]
        for opt in optimizers:
            for state in (opt.state.values() if opt is not None else []):
                tensors += list(state.values())
    tensors += [p for ref in trainer.ref_engines.values()
                for p in getattr(getattr(ref, "model", None), "parameters", list)()]
    return _bytes(tensors)


def serve_bytes(trainer) -> int:
    tensors = []
    for policy in trainer.gateway.policies.values():
        for engine in policy.router.engines:
            engine = getattr(engine, "engine", engine)  # an adapter view: the shared engine
            tensors += list(engine.model.parameters())
            lora = getattr(engine, "_lora", None)
            for layer in (lora._layers.values() if lora is not None else []):
                tensors += layer.lora_a + layer.lora_b
    return _bytes(tensors)


def run_arm(arm: str, steps: int, model: str | None, overrides: list[str] | None = None) -> dict:
    from areal_agents.config import load_config

    run_dir = tempfile.mkdtemp(prefix=f"lora_per_role_{arm}_")
    overrides = [f"run_dir={run_dir}", f"trainer.eval_every={steps}",
                 "trainer.checkpoint_every=0", "logging.progress=false", *(overrides or [])]
    if model:
        keys = ["base"] if arm == "adapters" else ["speaker", "listener"]
        overrides += [f"policies.{k}.model={model}" for k in keys]
    trainer = load_config(ARMS[arm], overrides).build()

    async def go() -> tuple[float, float, float, float, list[dict]]:
        """(setup wall s, setup CPU s, fit wall s, fit CPU s, history)."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        await trainer.setup()  # the warm start included
        t1, cpu1 = time.perf_counter(), time.process_time()
        history = await trainer.afit(steps)
        return t1 - t0, cpu1 - cpu0, time.perf_counter() - t1, time.process_time() - cpu1, history

    setup, setup_cpu, wall, cpu, history = asyncio.run(go())
    result = {
        "arm": arm, "steps": steps, "setup_s": setup, "step_s": wall / steps,
        "setup_cpu_s": setup_cpu, "cpu_s_per_step": cpu / steps,
        "train_s_per_step": sum(h.get(f"policy/{p}/time/train", 0.0) for h in history
                                for p in ("speaker", "listener")) / steps,
        "train_bytes": train_bytes(trainer), "serve_bytes": serve_bytes(trainer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "eval_success": {a: history[-1].get(f"eval/{a}/success") for a in ("speaker", "listener")},
        "train_success_last10": sum(h.get("train/speaker/success", 0.0) for h in history[-10:])
        / max(1, len(history[-10:])),
        "load_avg": os.getloadavg(),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default=None, help="override the tiny model (e.g. tiny:s)")
    parser.add_argument("--arm", choices=sorted(ARMS), help="run one arm here (internal)")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a config override for --arm (repeatable)")
    parser.add_argument("--combine", nargs=2, metavar=("SEPARATE_JSON", "ADAPTERS_JSON"),
                        help="print the table of two arms run apart with --arm ... --out")
    args = parser.parse_args()
    if args.arm:
        result = run_arm(args.arm, args.steps, args.model, args.overrides)
        result["overrides"] = args.overrides
        print(json.dumps(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return
    if args.combine:
        results = {arm: json.loads(Path(f).read_text())
                   for arm, f in zip(("separate", "adapters"), args.combine, strict=True)}
    else:
        results = {}
        for arm in ("separate", "adapters"):
            cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps)]
            cmd += ["--model", args.model] if args.model else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[arm] = json.loads(out.strip().splitlines()[-1])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict[str, dict]) -> None:
    sep, ada = results["separate"], results["adapters"]
    print(f"Signaling-v0, {sep['steps']} / {ada['steps']} steps; load average at the end "
          f"{sep['load_avg'][0]:.1f} / {ada['load_avg'][0]:.1f}")
    print(f"{'':28}{'separate':>14}{'adapters':>14}{'ratio':>9}")
    rows = [("train-side MB", "train_bytes", 2**20), ("serving-side MB", "serve_bytes", 2**20),
            ("peak RSS MB", "peak_rss_bytes", 2**20), ("wall s / step", "step_s", 1),
            ("CPU s / step", "cpu_s_per_step", 1),
            ("time/train s / step", "train_s_per_step", 1), ("setup s", "setup_s", 1),
            ("setup CPU s", "setup_cpu_s", 1)]
    for label, key, scale in rows:
        if key not in sep or key not in ada:  # results written before the key existed
            continue
        a, b = sep[key] / scale, ada[key] / scale
        print(f"{label:28}{a:14.3f}{b:14.3f}{b / a:9.3f}")
    for arm, r in results.items():
        print(f"{arm}: greedy eval success {r['eval_success']}, sampled success (last 10 steps)"
              f" {r['train_success_last10']:.3f}")


if __name__ == "__main__":
    main()
