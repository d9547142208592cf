"""Warm-start SolverJudge's judge on the starting solver's own answers, and grade it on more.

The recipe of ``examples/genrm/judge`` (round 3), for the trainable judge: SFT the solver
first, sample it (temperature 1, as in RL) on many task seeds through SolverJudge-v0, label
each answer by the env's exact verifier, balance the classes (``judge/run.py``'s ``balance``,
imported) and SFT a fresh judge on the judge prompts the env renders for those answers with
the true verdict (``correct`` / ``incorrect``). More answers of the same starting solver, on
other seeds, are the judge's fixed held-out set: ``grade_judge`` replays them through the env
to the current judge policy (greedy) at any step of the RL run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import areal_agents as aa
from areal_agents.agents import ScriptedAgent
from areal_agents.envs.solver_judge import SolverJudge
from areal_agents.trainers.episodes import play
from areal_agents.trainers.warm_start import demo_samples, sft
from areal_agents.trainers.wiring import backend_factory

TRAIN_SEEDS, HELD_OUT_SEEDS = 5_000_000, 5_100_000
"""Task seeds of the solver answers the judge is trained on, and of its held-out set."""


def judge_example() -> ModuleType:
    """``examples/genrm/judge/run.py`` as a module (examples are not a package)."""
    name = "_genrm_judge_run"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "judge" / "run.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass(frozen=True)
class Answer:
    """One solver answer: the task seed, the solver's reply, the judge prompt the env
    rendered for it and whether the reply is right (the env's exact verifier)."""

    seed: int
    reply: str
    prompt: str
    correct: bool


async def sample_answers(trainer: Any, env_kwargs: dict[str, Any], seeds: list[int]
                         ) -> list[Answer]:
    """The trainer's ``solver`` policy answers once per seed (temperature 1); the judge's
    seat is a placeholder that says ``correct`` (its reply is not used)."""
    placeholder = ScriptedAgent(lambda observation: "correct")

    async def one(seed: int) -> Answer:
        _, stats = await play(SolverJudge(**env_kwargs), seed, policy_of={"solver": "solver"},
                              fixed_agents={"judge": placeholder},
                              open_seat=trainer._open_seat, reward_fns=[])
        episode = stats.episode
        assert episode is not None
        reply = next(m["content"] for m in episode.messages["solver"]
                     if m["role"] == "assistant")
        prompt = next(m["content"] for m in episode.messages["judge"] if m["role"] == "user")
        return Answer(seed, reply or "", prompt, bool(episode.infos["judge"]["solver_correct"]))

    return list(await asyncio.gather(*(one(s) for s in seeds)))


async def rerender(env_kwargs: dict[str, Any], answers: list[Answer]) -> list[Answer]:
    """The same answers (seed, reply, truth) with the judge prompt the env renders for them
    under ``env_kwargs`` (e.g. with ``judge_sees_reference``): the reply is replayed through
    ``SolverJudge``, so the env stays the one home of the prompt text.

    Raises:
        ValueError: the env's verifier disagrees with an answer's stored truth.
    """

    async def one(a: Answer) -> Answer:
        env = SolverJudge(**env_kwargs)
        await env.reset(seed=a.seed)
        obs, *_ = await env.step({"solver": a.reply})
        if env.verify(env.solver_text) != a.correct:
            raise ValueError(f"seed {a.seed}: the env's verifier disagrees with the stored truth")
        return dataclasses.replace(a, prompt=obs["judge"][0]["content"])

    return list(await asyncio.gather(*(one(a) for a in answers)))


def judge_transcripts(answers: list[Answer], seed: int) -> list[list[dict[str, str]]]:
    """Judge SFT transcripts: the env's judge prompt, the true verdict; classes balanced by
    ``judge/run.py``'s ``balance`` (the smaller class resampled up to the larger)."""
    balanced = judge_example().balance([(a, a.correct) for a in answers], random.Random(seed))
    return [[{"role": "user", "content": a.prompt},
             {"role": "assistant", "content": "correct" if ok else "incorrect"}]
            for a, ok in balanced]


def sft_judge(transcripts: list[list[dict[str, str]]], steps: int, lr: float, seed: int
              ) -> tuple[Any, Any, list[float]]:
    """A fresh ``tiny:xs`` judge (init seed ``seed``) after ``steps`` SFT steps of 32 on
    ``transcripts`` (completions API, as the judge is served); (model, tokenizer, losses)."""
    model, tokenizer = aa.models.tiny("xs", seed=seed)
    samples = demo_samples(tokenizer, transcripts, api="completions")
    engine = backend_factory("fsdp")(model, lr=lr)
    try:
        losses = sft(engine, samples, steps, batch_size=32, seed=seed,
                     pad_token_id=tokenizer.pad_token_id or 0)
    finally:
        engine.close()
    return model, tokenizer, losses


async def grade_judge(trainer: Any, env_kwargs: dict[str, Any], answers: list[Answer]
                      ) -> dict[str, float]:
    """The trainer's ``judge`` policy (greedy) on fixed solver answers, replayed through the
    env: ``accuracy``, ``balanced_accuracy``, ``false_positive_rate`` (wrong answers called
    correct), ``false_negative_rate``, ``said_correct``, ``no_verdict``; a reply without a
    verdict counts as a miss in both classes.

    Raises:
        ValueError: the replayed env rendered another prompt than the one stored.
    """
    verdicts = await judge_verdicts(trainer, env_kwargs, answers)
    return verdict_rates([(a.correct, v) for a, v in zip(answers, verdicts, strict=True)])


async def judge_verdicts(trainer: Any, env_kwargs: dict[str, Any], answers: list[Answer]
                         ) -> list[str | None]:
    """The greedy verdict of the trainer's ``judge`` policy on each of ``answers`` (see
    ``grade_judge``), in order.

    Raises:
        ValueError: the replayed env rendered another prompt than the one stored.
    """

    async def one(a: Answer) -> str | None:
        _, stats = await play(SolverJudge(**env_kwargs), a.seed, policy_of={"judge": "judge"},
                              fixed_agents={"solver": ScriptedAgent(lambda obs: a.reply)},
                              open_seat=trainer._open_seat, reward_fns=[], greedy=True)
        episode = stats.episode
        assert episode is not None
        prompt = next(m["content"] for m in episode.messages["judge"] if m["role"] == "user")
        if prompt != a.prompt:
            raise ValueError(f"seed {a.seed}: the env rendered another judge prompt")
        return episode.infos["judge"]["verdict"]

    return list(await asyncio.gather(*(one(a) for a in answers)))


def paired_change(answers: list[Answer], before: list[str | None], after: list[str | None]
                  ) -> dict[str, int]:
    """How the judge's grading of the same answers changed: ``kept`` (right both times),
    ``gained`` (wrong, then right), ``lost`` (right, then wrong), ``neither``. ``gained -
    lost`` over ``len(answers)`` is the accuracy change; McNemar's test reads the two counts.

    Example:
        >>> a = [Answer(0, "", "", True), Answer(1, "", "", False), Answer(2, "", "", True)]
        >>> paired_change(a, ["correct", "correct", None], ["correct", "incorrect", "correct"])
        {'kept': 1, 'gained': 2, 'lost': 0, 'neither': 0}
    """
    out = dict.fromkeys(("kept", "gained", "lost", "neither"), 0)
    for a, b, c in zip(answers, before, after, strict=True):
        hit0, hit1 = (b == "correct") == a.correct and b is not None, \
            (c == "correct") == a.correct and c is not None
        out["kept" if hit0 and hit1 else "gained" if hit1 else "lost" if hit0 else "neither"] += 1
    return out


def verdict_rates(pairs: list[tuple[bool, str | None]]) -> dict[str, float]:
    """Rates of ``(solver_correct, verdict)`` pairs (see ``grade_judge``); a class with no
    member leaves its rate out (and the balanced accuracy).

    Example:
        >>> r = verdict_rates([(True, "correct"), (False, "correct"), (False, "incorrect")])
        >>> r["accuracy"], r["false_positive_rate"], r["balanced_accuracy"]
        (0.6666666666666666, 0.5, 0.75)
    """
    right = [v == "correct" for ok, v in pairs if ok]
    wrong = [v == "incorrect" for ok, v in pairs if not ok]
    out = {"answers": float(len(pairs)), "right": float(len(right)),
           "accuracy": (sum(right) + sum(wrong)) / len(pairs) if pairs else float("nan"),
           "said_correct": sum(v == "correct" for _, v in pairs) / max(len(pairs), 1),
           "no_verdict": sum(v is None for _, v in pairs) / max(len(pairs), 1)}
    if right:
        out["false_negative_rate"] = 1.0 - sum(right) / len(right)
    if wrong:
        out["false_positive_rate"] = 1.0 - sum(wrong) / len(wrong)
    if right and wrong:
        out["balanced_accuracy"] = 0.5 * (sum(right) / len(right) + sum(wrong) / len(wrong))
    return out


def save_warm_start(folder: Path, settings: dict[str, Any], models: dict[str, Any],
                    held_out: list[Answer], data: dict[str, Any]) -> None:
    """Write a warm start to ``folder``: ``solver/`` and ``judge/`` checkpoints (a ``(model,
    tokenizer)`` pair is saved, a checkpoint folder's path copied), the held-out answers and
    data figures, and the ``settings`` that made it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, entry in models.items():
        if isinstance(entry, str | Path):
            shutil.copytree(entry, folder / name, dirs_exist_ok=True)
            continue
        model, tokenizer = entry
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    (folder / "warm_start.json").write_text(json.dumps({
        "settings": settings, "data": data,
        "held_out": [dataclasses.asdict(a) for a in held_out]}, indent=1))


def load_warm_start(folder: Path, settings: dict[str, Any]
                    ) -> tuple[dict[str, Any], list[Answer], dict[str, Any]] | None:
    """What ``save_warm_start`` wrote to ``folder`` (models as checkpoint paths, for
    ``Policy(model=...)``), or None when there is none.

    Raises:
        ValueError: the folder holds a warm start made with other ``settings``.
    """
    path = folder / "warm_start.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != settings:
        diff = sorted(k for k in {*settings, *saved["settings"]}
                      if settings.get(k) != saved["settings"].get(k))
        raise ValueError(f"{folder} holds a warm start made with other settings ({diff}); "
                         "use another --warm-start-cache folder")
    models = {name: str(folder / name) for name in ("solver", "judge")}
    return models, [Answer(**a) for a in saved["held_out"]], saved["data"]
