"""A trainable judge: SolverJudge-v0 with two separately parameterised LLMs, both trained.

The solver answers one-digit ``a + b`` / ``a - b``; the judge reads the task and the
solver's reply and says ``correct`` or ``incorrect``. The judge is rewarded for agreeing with
the exact verifier; the solver by the judge's verdict (``--truth-weight w`` mixes in ground
truth: ``(1 - w) * verdict + w * truth``).

Warm starts (``--judge-warm-start``): ``demos`` (rounds 1-2): the Trainer's SFT warm start,
the solver imitating demo replies (``--solver-demo-accuracy``), the judge the exact scripted
judge on them; ``own-answers`` (round 3, ``own_answers.py``): the solver is SFT'd first, then
a fresh judge is SFT'd on the solver's *own* answers (``--own-answers`` task seeds, labelled
by the exact verifier, classes balanced), and graded greedy on ``--judge-held-out`` more of
them at step 0, every ``--judge-eval-every`` steps and at the end. The judge's reward
(``--judge-reward``): ``agreement``, ``balanced`` (``BalancedJudgeReward``) or ``per-class``
(``class_balance.PerClassJudgeReward``: per-class baseline and weights inside each group).
``--judge-samples K`` (round 4): the judge is asked K times on each answer (``SolverJudge``'s
``judge_samples``: K judge seats on one policy, each verdict its own sample and reward, the
solver paid by the mean verdict), and with ``--judge-groups answer`` (the default for K > 1)
the judge's GRPO groups are the K verdicts on one answer (the judge policy's GRPO with
``group_by="episode"``: its samples of one episode form a group). ``--judge-replay f`` (round
6, ``replay.py``): in ``round(f * group_size)`` episodes of every training group the judge
grades an answer of the starting solver drawn from a pool disjoint from the held-out set
(no shared task seed or judge prompt); the solver does not act in them.
``--judge-reference`` (round 7): the judge's prompt also carries the correct result
(``SolverJudge(judge_sees_reference=True)``), in training, in its warm-start data and in the
held-out grading alike; ``--reuse-solver DIR`` takes the starting solver and its answers from
an earlier warm-start cache and SFTs a fresh judge on them (prompts re-rendered by the env).

Logged every step (``RUN_DIR/metrics.jsonl``; ``areal-agents plot RUN_DIR``):
``train/judge/success`` = the judge's accuracy against ground truth, ``train/solver/success``
= the solver's true accuracy, ``train/solver/reward`` = how often the judge said correct,
from ``JudgeTally`` ``judge_stats/{false_positive_rate,false_negative_rate,no_verdict}``,
from ``PerClassJudgeReward`` ``judge_groups/*`` (base rate of right answers, verdict share,
accuracy and group-centred reward per class, balanced accuracy), ``policy/judge/entropy``,
``heldout_judge/*``, and with ``--judge-replay`` ``replay/*`` and ``live/*`` (``ReplayTally``:
the live solver's true accuracy; ``train/solver/success`` averages in replay episodes as 0)
and ``replay_pool_judge/*``. Greedy held-out figures at step 0 (after the warm start) and at the
end are in ``RUN_DIR/summary.json``.

Usage::

    OMP_NUM_THREADS=1 python examples/genrm/solver_judge/run.py --run-dir runs/genrm_sj
    areal-agents plot runs/genrm_sj
    # round 3 (README): own-answers warm start, per-class judge reward, truth weight 0.5
    OMP_NUM_THREADS=1 python examples/genrm/solver_judge/run.py --run-dir runs/genrm_sj3 \
        --judge-warm-start own-answers --solver-demo-accuracy 1.0 --solver-sft-steps 200 \
        --judge-reward per-class --truth-weight 0.5 --group-size 8
    # round 4 (README): 4 judge verdicts per answer, grouped per answer
    OMP_NUM_THREADS=1 python examples/genrm/solver_judge/run.py --run-dir runs/genrm_sj4 \
        --judge-warm-start own-answers --solver-demo-accuracy 1.0 --solver-sft-steps 200 \
        --judge-reward per-class --truth-weight 0.5 --group-size 8 --judge-samples 4
    # round 6 (README): round 5's TL (judge temperature 1.3, judge lr 1e-4) + replay of half
    # of each group's judge episodes
    OMP_NUM_THREADS=1 python examples/genrm/solver_judge/run.py --run-dir runs/genrm_sj6 \
        --judge-warm-start own-answers --solver-demo-accuracy 1.0 --solver-sft-steps 200 \
        --judge-reward per-class --truth-weight 0.5 --group-size 8 --judge-samples 4 \
        --judge-temperature 1.3 --judge-lr 1e-4 --judge-replay 0.5
    # round 7 (README, its leading command): round 5's TL with a reference-guided judge,
    # warm-started for 100 SFT steps (800 leave it at ~1.0 on the held-out answers: no room
    # to improve), 200 steps (clearly better at all three seeds; at 100 steps at two)
    OMP_NUM_THREADS=1 python examples/genrm/solver_judge/run.py --run-dir runs/genrm_sj7 \
        --judge-warm-start own-answers --solver-demo-accuracy 1.0 --solver-sft-steps 200 \
        --judge-reward per-class --truth-weight 0.5 --group-size 8 --judge-samples 4 \
        --judge-temperature 1.3 --judge-lr 1e-4 --judge-reference --judge-sft-steps 100 \
        --steps 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from class_balance import PerClassJudgeReward
from judge_seats import judge_infos
from own_answers import (
    HELD_OUT_SEEDS,
    TRAIN_SEEDS,
    Answer,
    grade_judge,
    judge_transcripts,
    judge_verdicts,
    load_warm_start,
    paired_change,
    rerender,
    sample_answers,
    save_warm_start,
    sft_judge,
    verdict_rates,
)
from replay import (
    ReplayPool,
    ReplaySolverJudge,
    ReplayTally,
    disjoint_pool,
    load_pool,
    save_pool,
)

import areal_agents as aa
from areal_agents.envs.solver_judge import SolverJudge
from areal_agents.episode import Episode

STOP = ["<|im_end|>"]
WARM_START_SETTINGS = ("seed", "sft_steps", "solver_sft_steps", "demos", "solver_demo_accuracy",
                       "lr", "batch_size", "group_size", "truth_weight", "own_answers",
                       "judge_held_out", "judge_sft_steps", "judge_sft_lr")
"""The options an own-answers warm start depends on (``--warm-start-cache`` checks them);
``warm_start_settings`` adds ``judge_reference`` and ``reuse_solver`` when set."""
EVAL_SEEDS = 2_000_000
"""The first evaluation seed (``--eval-seeds`` count up from it; they never replay)."""


class JudgeTally:
    """A reward function that adds nothing and counts the judge's verdicts (every judge seat's,
    ``judge_samples`` of them per episode) against ground truth (``info["solver_correct"]``);
    ``take_metrics()`` is logged by the Trainer each step.

    ``false_positive_rate``: verdicts "correct" on wrong answers / verdicts on wrong answers;
    ``false_negative_rate``: verdicts "incorrect" on right answers / verdicts on right answers;
    ``no_verdict``: replies without a verdict / replies; ``episodes`` and ``verdicts``: counts.
    """

    policy: str | None = None  # calls no served model (aa.rewards.hooks.ModelReward)

    def __init__(self) -> None:
        self.counts = dict.fromkeys(("tp", "fp", "tn", "fn", "none"), 0)
        self.episodes = 0

    def bind(self, client: Any) -> None:
        """No model to call."""

    def __call__(self, episode: Episode) -> float:
        seats = judge_infos(episode)
        self.episodes += bool(seats)
        for _, info in seats:
            truth, verdict = info["solver_correct"], info["verdict"]
            if verdict is None:
                self.counts["none"] += 1
            else:
                said = verdict == "correct"
                self.counts[("t" if said == truth else "f") + ("p" if said else "n")] += 1
        return 0.0

    def take_metrics(self) -> dict[str, float]:
        """The rates over the episodes since the last call; the counts restart."""
        c, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        episodes, self.episodes = self.episodes, 0
        wrong, right = c["fp"] + c["tn"], c["tp"] + c["fn"]
        total = sum(c.values())
        out = {"judge_stats/episodes": float(episodes), "judge_stats/verdicts": float(total)}
        if wrong:
            out["judge_stats/false_positive_rate"] = c["fp"] / wrong
        if right:
            out["judge_stats/false_negative_rate"] = c["fn"] / right
        if total:
            out["judge_stats/no_verdict"] = c["none"] / total
        return out


class BalancedJudgeReward:
    """Class-balanced judge reward: a reward function that rescales the env's agreement reward
    of the judge so that each class of solver answer (right / wrong) carries half the weight.

    It adds ``agreed * (0.5 / p_class - 1)`` to the judge's env reward (``agreed``: 1 when the
    verdict matches ground truth), so the judge's total is ``agreed * 0.5 / p_class``, where
    ``p_class`` is the running share of that class among the episodes seen so far (counts
    start at one each). The expected total is then the judge's *balanced* accuracy: always
    saying "incorrect" earns 0.5 however rare right answers are, only a judge that checks the
    answer earns 1. The solver's reward is left alone.

    Example:
        >>> fn = BalancedJudgeReward()
        >>> fn.weight(True), fn.weight(False)  # no data yet: p = 0.5 for both
        (1.0, 1.0)
    """

    policy: str | None = None  # calls no served model

    def __init__(self) -> None:
        self.counts = {True: 1, False: 1}  # solver right / wrong, Laplace-smoothed

    def bind(self, client: Any) -> None:
        """No model to call."""

    def weight(self, solver_correct: bool) -> float:
        """``0.5 / p_class`` for an episode whose solver answer is ``solver_correct``."""
        return 0.5 * sum(self.counts.values()) / self.counts[solver_correct]

    def __call__(self, episode: Episode) -> dict[str, float]:
        info = episode.infos.get("judge", {})
        if "solver_correct" not in info:
            return {}
        truth = bool(info["solver_correct"])
        self.counts[truth] += 1
        agreed = float(info["success"])
        return {"judge": agreed * (self.weight(truth) - 1.0)}

    def take_metrics(self) -> dict[str, float]:
        """``judge_balance/p_solver_correct``: the running share of right answers."""
        return {"judge_balance/p_solver_correct":
                self.counts[True] / sum(self.counts.values())}


def mostly_right_solver(accuracy: float, seed: int = 0) -> Any:
    """A warm-start player for the solver: the right ``Answer: n`` with probability
    ``accuracy``, else a near miss (off by 1-3), so the judge's demos see both classes."""
    import random

    from areal_agents.agents.players import arithmetic_solver

    rng = random.Random(seed)

    def player(observation: Any) -> str:
        right = arithmetic_solver(observation)
        if rng.random() < accuracy:
            return right
        return f"Answer: {int(right.removeprefix('Answer: ')) + rng.choice([-3, -2, -1, 1, 2, 3])}"

    return player


def env_kwargs(args: argparse.Namespace, judge_samples: int = 1) -> dict[str, Any]:
    """SolverJudge-v0 on one-digit ``a + b`` / ``a - b``, ``judge_samples`` verdicts per
    answer (1 for the warm start and held-out grading: one judge seat); with
    ``--judge-reference`` the judge's prompt carries the correct result (training, the
    warm start's judge prompts and the held-out grading alike: they all come from here)."""
    return {"task": "arithmetic", "digits": 1, "operations": "+-",
            "truth_weight": args.truth_weight, "judge_samples": judge_samples,
            "judge_sees_reference": args.judge_reference}


def warm_start_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings an own-answers warm start is cached under: ``WARM_START_SETTINGS``, plus
    ``judge_reference`` and ``reuse_solver`` when set (so caches made without them still
    match runs without them)."""
    settings = {k: getattr(args, k) for k in WARM_START_SETTINGS}
    if args.judge_reference:
        settings["judge_reference"] = True
    if args.reuse_solver:
        settings["reuse_solver"] = str(args.reuse_solver)
    return settings


def reused_answers(args: argparse.Namespace) -> tuple[str, list[Answer], list[Answer]]:
    """``--reuse-solver DIR``: the starting solver (checkpoint path), its training answers
    (``replay_pool.json``) and its held-out answers from another own-answers warm-start cache
    made with the same solver settings (every ``WARM_START_SETTINGS`` but the judge's SFT
    ones); the answers' judge prompts are as that cache's run rendered them.

    Raises:
        ValueError: the cache was made with other solver settings, or lacks its answers.
    """
    folder = Path(args.reuse_solver)
    saved = json.loads((folder / "warm_start.json").read_text())
    solver_keys = [k for k in WARM_START_SETTINGS if k not in ("judge_sft_steps", "judge_sft_lr")]
    diff = [k for k in solver_keys if saved["settings"].get(k) != getattr(args, k)]
    if diff:
        raise ValueError(f"{folder} holds a solver made with other settings ({diff})")
    train = load_pool(folder)
    if len(train) != args.own_answers:
        raise ValueError(f"{folder} holds {len(train)} training answers, not {args.own_answers}")
    held_out = [Answer(**a) for a in saved["held_out"]]
    return str(folder / "solver"), train, held_out


def judge_groups(args: argparse.Namespace) -> str:
    """``--judge-groups``, resolved: ``answer`` by default when there are several verdicts
    per answer (with one verdict a group per answer holds one sample: no advantage).

    Raises:
        ValueError: ``answer`` groups with one verdict per answer.
    """
    groups = args.judge_groups or ("answer" if args.judge_samples > 1 else "task")
    if groups == "answer" and args.judge_samples < 2:
        raise ValueError("--judge-groups answer needs --judge-samples >= 2 (a group of one "
                         "verdict has advantage 0)")
    return groups


def policy(args: argparse.Namespace, model: Any, seed: int, max_tokens: int, sft_steps: int,
           lr: float, temperature: float = 1.0, **extra: Any) -> aa.Policy:
    """A tiny policy served with the completions API, sampled at ``temperature``."""
    return aa.Policy(model=model, seed=seed, lr=lr, api="completions", sft_steps=sft_steps,
                     sft_lr=3e-3, **extra, sampling={"temperature": temperature,
                                                     "max_tokens": max_tokens, "stop": STOP})


def solver_demos(args: argparse.Namespace) -> Any:
    """The solver's warm-start player: the env's random replies, or ``mostly_right_solver``."""
    return ("random" if args.solver_demo_accuracy is None
            else mostly_right_solver(args.solver_demo_accuracy, args.seed))


def make_trainer(args: argparse.Namespace, tally: JudgeTally,
                 models: dict[str, Any] | None = None, replay: ReplayPool | None = None) -> Any:
    """The two-policy run: ``solver`` and ``judge``, each its own tiny model and optimizer
    (every judge seat of ``--judge-samples`` acts with ``judge``).

    Without ``models`` both are warm-started by the Trainer on demo episodes (the solver
    imitates ``solver_demos``, the judge the exact scripted judge on those replies); with
    ``models`` (``{"solver": (model, tokenizer), "judge": ...}``, already warm-started by
    ``own_answer_warm_start``) there is no warm start here. With ``replay`` the env is
    ``ReplaySolverJudge`` on that pool (fill it before training) and a ``ReplayTally`` counts
    replay and live episodes.

    Raises:
        ValueError: ``--judge-replay`` > 0 without ``replay``.
    """
    if args.judge_replay and replay is None:
        raise ValueError("--judge-replay needs a replay pool (--judge-warm-start own-answers)")
    group_fns: list[Any] = []
    reward_fns: list[Any] = [tally]
    judge_extra: dict[str, Any] = {}
    params = {k: v for k, v in (("kl_coef", args.judge_kl),
                                ("entropy_coef", args.judge_entropy)) if v}
    if params:
        judge_extra["algorithm_params"] = params
    if args.judge_reward == "balanced":
        reward_fns.append(BalancedJudgeReward())
    elif args.judge_reward == "per-class":  # advantages are not std-rescaled per group
        judge_extra["algorithm_params"] = {**judge_extra.get("algorithm_params", {}),
                                           "std_normalize": False}
    groups = judge_groups(args)
    per_answer = groups == "answer"
    if per_answer:  # the judge's K verdicts on one answer (one episode) are one GRPO group
        judge_extra["algorithm_params"] = {**judge_extra.get("algorithm_params", {}),
                                           "group_by": "episode"}
    elif groups == "none":  # a per-seat moving average: a shared mistake still costs
        judge_extra["algorithm_params"] = {**judge_extra.get("algorithm_params", {}),
                                           "baseline": "ema"}
    group_fns.append(PerClassJudgeReward(normalise=args.judge_reward == "per-class",
                                         per_answer=per_answer))
    judge_lr = args.judge_lr or args.lr
    solver_lr = args.solver_lr or args.lr
    judge_extra["temperature"] = args.judge_temperature
    if models is None:
        policies = {"solver": policy(args, "tiny:xs", args.seed, 6,
                                     args.solver_sft_steps or args.sft_steps, solver_lr),
                    "judge": policy(args, "tiny:xs", args.seed + 1, 3, args.sft_steps,
                                    judge_lr, **judge_extra)}
        warm_start: dict[str, Any] | None = {
            "episodes": args.demos,
            "players": {"solver": solver_demos(args), "judge": "solver_judge_judge"}}
    else:
        policies = {"solver": policy(args, models["solver"], args.seed, 6, 0, solver_lr),
                    "judge": policy(args, models["judge"], args.seed + 1, 3, 0, judge_lr,
                                    **judge_extra)}
        warm_start = None
    kwargs = env_kwargs(args, args.judge_samples)
    seats = SolverJudge(**kwargs).possible_agents
    env: Any = "SolverJudge-v0"
    if replay is not None:
        pool = replay

        def replay_env() -> ReplaySolverJudge:
            return ReplaySolverJudge(pool, **kwargs)

        env = replay_env

        reward_fns.append(ReplayTally())
    return aa.Trainer(
        env=env, env_kwargs=kwargs, policies=policies,
        policy_map={a: "solver" if a == "solver" else "judge" for a in seats},
        reward_fns=reward_fns, group_reward_fns=group_fns, algorithm=aa.GRPO(),
        batch_size=args.batch_size, group_size=args.group_size, seed=args.seed,
        eval_seeds=range(EVAL_SEEDS, EVAL_SEEDS + args.eval_seeds), progress=False,
        warm_start=warm_start, run_dir=args.run_dir)


async def own_answer_warm_start(args: argparse.Namespace) -> tuple[
        dict[str, Any], list[Answer], dict[str, Any], list[Answer]]:
    """Warm-start the solver (SFT on ``solver_demos``), sample it on ``args.own_answers``
    training seeds and ``args.judge_held_out`` held-out seeds, SFT a fresh judge on the
    class-balanced training answers (``own_answers``). Returns the two ``(model,
    tokenizer)`` pairs, the held-out answers, the figures of the data and the training
    answers ([] when read from ``--warm-start-cache``, which keeps only the held-out ones)."""
    from areal_agents.agents import ScriptedAgent

    settings = warm_start_settings(args)
    if args.warm_start_cache:
        cached = load_warm_start(Path(args.warm_start_cache), settings)
        if cached is not None:
            print(f"warm start read from {args.warm_start_cache}", flush=True)
            return (*cached, [])
    solver: Any
    if args.reuse_solver:
        solver, train, held_out = reused_answers(args)
        train, held_out = (await rerender(env_kwargs(args), train),
                           await rerender(env_kwargs(args), held_out))
        return await judge_warm_start(args, settings, solver, train, held_out)
    solver = aa.models.tiny("xs", seed=args.seed)
    pre = aa.Trainer(
        env="SolverJudge-v0", env_kwargs=env_kwargs(args),
        policies={"solver": policy(args, solver, args.seed, 6,
                                   args.solver_sft_steps or args.sft_steps, args.lr)},
        policy_map={"solver": "solver"},
        agents={"judge": ScriptedAgent(lambda observation: "correct")},
        batch_size=args.batch_size, group_size=args.group_size, seed=args.seed,
        progress=False, warm_start={"episodes": args.demos, "players": {
            "solver": solver_demos(args), "judge": "solver_judge_judge"}})
    try:
        await pre.setup()
        seeds = [*range(TRAIN_SEEDS, TRAIN_SEEDS + args.own_answers),
                 *range(HELD_OUT_SEEDS, HELD_OUT_SEEDS + args.judge_held_out)]
        answers = await sample_answers(pre, env_kwargs(args), seeds)
    finally:
        await pre.aclose()
    train, held_out = answers[:args.own_answers], answers[args.own_answers:]
    return await judge_warm_start(args, settings, solver, train, held_out)


async def judge_warm_start(args: argparse.Namespace, settings: dict[str, Any], solver: Any,
                           train: list[Answer], held_out: list[Answer]) -> tuple[
        dict[str, Any], list[Answer], dict[str, Any], list[Answer]]:
    """SFT a fresh judge on the class-balanced ``train`` answers (their judge prompts, the
    true verdict) and save the warm start to ``--warm-start-cache`` (with ``train`` as its
    replay pool when reused from ``--reuse-solver``); ``own_answer_warm_start``'s result."""
    transcripts = judge_transcripts(train, args.seed + 2)
    judge_model, judge_tok, losses = await asyncio.to_thread(
        sft_judge, transcripts, args.judge_sft_steps, args.judge_sft_lr, args.seed + 1)
    print(f"solver answers: {sum(a.correct for a in train)} of {len(train)} right; judge SFT"
          f" nll {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    data = {"answers": len(train), "right": sum(a.correct for a in train),
            "distinct": len({a.prompt for a in train}), "balanced": len(transcripts),
            "held_out": len(held_out), "held_out_right": sum(a.correct for a in held_out),
            "judge_sft_nll_first": losses[0], "judge_sft_nll_last": losses[-1]}
    models = {"solver": solver, "judge": (judge_model, judge_tok)}
    if args.warm_start_cache:
        cache = Path(args.warm_start_cache)
        save_warm_start(cache, settings, models, held_out, data)
        if args.reuse_solver:
            save_pool(cache, train)
    return models, held_out, data, train


async def fill_replay(args: argparse.Namespace, trainer: Any, replay: ReplayPool,
                      train: list[Answer], held_out: list[Answer]) -> dict[str, Any]:
    """Fill ``replay`` with the starting solver's training answers, less those sharing a
    judge prompt with a held-out answer (``disjoint_pool``): ``train`` when the warm start
    was made now, else ``replay_pool.json`` in ``--warm-start-cache``, else sampled from the
    trainer's solver before its first step (the starting solver; saved to the cache).
    Returns the pool's figures."""
    cache = Path(args.warm_start_cache) if args.warm_start_cache else None
    answers = train or (load_pool(cache) if cache else [])
    sampled = not answers
    if sampled:
        seeds = list(range(TRAIN_SEEDS, TRAIN_SEEDS + args.own_answers))
        answers = await sample_answers(trainer, env_kwargs(args), seeds)
    if cache and not (cache / "replay_pool.json").exists():
        save_pool(cache, answers)
    pool, dropped = disjoint_pool(answers, held_out, args.replay_disjoint)
    replay.fill(pool, held_out, args.replay_disjoint)
    prompts = {a.prompt for a in pool}
    figures = {"answers": len(answers), "sampled_now": sampled, "disjoint": args.replay_disjoint,
               "dropped_shared_prompt": dropped, "pool": len(pool),
               "pool_right": sum(a.correct for a in pool), "per_group": replay.per_group,
               "held_out_prompt_in_pool": sum(a.prompt in prompts for a in held_out)}
    print(f"replay pool: {json.dumps(figures)}", flush=True)
    return figures


async def evaluate(trainer: Any, tally: JudgeTally) -> dict[str, float]:
    """Greedy held-out episodes: ``eval/<agent>/{reward,success}`` + the judge's rates."""
    tallies = [tally, *(fn for fn in trainer.reward_fns if isinstance(fn, ReplayTally))]
    for fn in tallies:
        fn.take_metrics()  # drop counts of training episodes still in flight
    out = await trainer.evaluate()
    for fn in tallies:
        out.update({f"eval/{k}": v for k, v in fn.take_metrics().items()})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm start, evaluate (step 0), train ``args.steps`` steps, evaluate; the figures.

    With ``--judge-warm-start own-answers`` the judge is also graded (greedy) on the fixed
    held-out answers of the starting solver at step 0, every ``args.judge_eval_every`` steps
    and at the end (``judge_heldout`` in the result and ``heldout_judge/*`` in the metrics).
    """
    tally = JudgeTally()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    models, held_out, data, train = None, [], {}, []
    if args.judge_replay and args.judge_warm_start != "own-answers":
        raise ValueError("--judge-replay needs --judge-warm-start own-answers (the pool is "
                         "the starting solver's own answers)")
    if args.judge_warm_start == "own-answers":
        models, held_out, data, train = await own_answer_warm_start(args)
    replay = (ReplayPool(args.judge_replay, args.group_size, EVAL_SEEDS, seed=args.seed + 3)
              if args.judge_replay else None)
    trainer = make_trainer(args, tally, models, replay)
    curve: list[dict[str, float]] = []
    pool_curve: list[dict[str, float]] = []  # the judge on pool answers it trains on
    probe: list[Answer] = []
    graded: list[list[str | None]] = []  # the held-out verdicts of each grading
    history: list[dict[str, float]] = []
    try:
        await trainer.setup()
        if replay is not None:
            data = {**data, "replay": await fill_replay(args, trainer, replay, train, held_out)}
            probe = random.Random(args.seed).sample(
                replay.answers, min(len(replay.answers), args.judge_held_out))

        async def grade() -> None:
            if held_out:
                verdicts = await judge_verdicts(trainer, env_kwargs(args), held_out)
                graded.append(verdicts)
                rates = verdict_rates([(a.correct, v) for a, v in
                                       zip(held_out, verdicts, strict=True)])
                curve.append({"step": trainer.step, **rates})
                print(f"held-out judge, step {trainer.step}: {json.dumps(rates)}", flush=True)
                trainer.logger.log(trainer.step, {f"heldout_judge/{k}": v
                                                  for k, v in rates.items()})
            if probe:
                rates = await grade_judge(trainer, env_kwargs(args), probe)
                pool_curve.append({"step": trainer.step, **rates})
                trainer.logger.log(trainer.step, {f"replay_pool_judge/{k}": v
                                                  for k, v in rates.items()})

        await grade()
        start = await evaluate(trainer, tally)
        trainer.logger.log(0, start)
        every = args.judge_eval_every if held_out and args.judge_eval_every else args.steps
        while trainer.step < args.steps:
            rows = await trainer.afit(min(args.steps, trainer.step + every))
            done = {r["step"] for r in rows}  # afit returns the run's rows so far
            history = [r for r in history if r["step"] not in done] + rows
            if trainer.step < args.steps:
                await grade()
        await grade()
        final = await evaluate(trainer, tally)
        trainer.logger.log(trainer.step, final)
    finally:
        await trainer.aclose()
    keys = ("train/judge/success", "train/solver/success", "train/solver/reward",
            "judge_stats/false_positive_rate", "judge_stats/false_negative_rate",
            "judge_groups/balanced_accuracy", "judge_groups/p_right",
            "judge_groups/said_correct", "judge_groups/advantage_right",
            "judge_groups/advantage_wrong", "policy/judge/entropy", "live/solver_success",
            "live/judge_accuracy", "replay/judge_accuracy", "replay/share")
    k = max(1, len(history) // 5)

    def mean(rows: list[dict[str, float]], key: str) -> float:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    paired = paired_change(held_out, graded[0], graded[-1]) if graded else {}
    by_pool: dict[str, Any] = {}  # held-out answers whose judge prompt the pool has, or not
    if replay is not None and graded:
        prompts = {a.prompt for a in replay.answers}
        for name, keep in (("in_pool", True), ("not_in_pool", False)):
            idx = [i for i, a in enumerate(held_out) if (a.prompt in prompts) == keep]
            if idx:
                part = [held_out[i] for i in idx]
                by_pool[name] = {
                    "start": verdict_rates([(held_out[i].correct, graded[0][i]) for i in idx]),
                    "end": verdict_rates([(held_out[i].correct, graded[-1][i]) for i in idx]),
                    "paired": paired_change(part, [graded[0][i] for i in idx],
                                            [graded[-1][i] for i in idx])}
    return {"start": start, "final": final, "steps": len(history), "judge_data": data,
            "judge_heldout": curve, "judge_heldout_paired": paired,
            "replay_pool_judge": pool_curve, "heldout_by_pool_prompt": by_pool,
            "train_first": {key: mean(history[:k], key) for key in keys},
            "train_last": {key: mean(history[-k:], key) for key in keys},
            "per_step": [{"step": h["step"], **{key: h.get(key) for key in keys}}
                         for h in history],
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/genrm_sj")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--sft-steps", type=int, default=100, help="warm-start SFT steps per policy")
    p.add_argument("--solver-sft-steps", type=int, default=0,
                   help="the solver's warm-start SFT steps (0: --sft-steps)")
    p.add_argument("--demos", type=int, default=256, help="warm-start episodes")
    p.add_argument("--solver-demo-accuracy", type=float, default=None,
                   help="solver demos right with this probability, else near misses (default: "
                   "the env's random replies)")
    p.add_argument("--judge-reward", choices=("agreement", "balanced", "per-class"),
                   default="agreement",
                   help="the judge's reward: agreement with ground truth, class-balanced "
                   "(BalancedJudgeReward), or normalised per class inside each group "
                   "(PerClassJudgeReward)")
    p.add_argument("--judge-warm-start", choices=("demos", "own-answers"), default="demos",
                   help="demos: the Trainer's warm start on demo episodes; own-answers: SFT "
                   "the solver first, then the judge on the solver's own labelled answers")
    p.add_argument("--own-answers", type=int, default=2000,
                   help="own-answers: the starting solver's answers the judge is SFT'd on")
    p.add_argument("--judge-held-out", type=int, default=400,
                   help="own-answers: held-out answers of the starting solver the judge is "
                   "graded on")
    p.add_argument("--judge-eval-every", type=int, default=20,
                   help="own-answers: grade the judge on the held-out answers every k steps")
    p.add_argument("--judge-sft-steps", type=int, default=800,
                   help="own-answers: the judge's SFT steps (batches of 32)")
    p.add_argument("--judge-sft-lr", type=float, default=1e-3)
    p.add_argument("--judge-lr", type=float, default=0.0, help="the judge's RL lr (0: --lr)")
    p.add_argument("--solver-lr", type=float, default=0.0,
                   help="the solver's RL lr (0: --lr); not a warm-start setting")
    p.add_argument("--judge-kl", type=float, default=0.0,
                   help="the judge's KL coefficient to its warm-started weights")
    p.add_argument("--judge-entropy", type=float, default=0.0,
                   help="the judge's entropy bonus coefficient")
    p.add_argument("--judge-samples", type=int, default=1,
                   help="judge verdicts per solver answer (SolverJudge's judge_samples)")
    p.add_argument("--judge-groups", choices=("task", "answer", "none"), default=None,
                   help="the judge's GRPO groups: all verdicts of a task's episodes (task), "
                   "the verdicts on one answer (answer; default with --judge-samples > 1), or "
                   "none: a per-seat moving-average baseline (with --judge-reward per-class "
                   "the per-class baseline is then the only one: a mistake all K verdicts "
                   "share still gets a negative advantage)")
    p.add_argument("--judge-temperature", type=float, default=1.0,
                   help="the judge's sampling temperature in training")
    p.add_argument("--warm-start-cache", default=None,
                   help="own-answers: a folder for the warm-started models and held-out "
                   "answers; reused when its settings match, else written")
    p.add_argument("--judge-replay", type=float, default=0.0,
                   help="own-answers: this share of each training group's episodes has the "
                   "judge grade a pool answer of the starting solver (not the held-out ones); "
                   "the solver does not act in them (replay.py)")
    p.add_argument("--replay-disjoint", choices=("prompt", "seed"), default="prompt",
                   help="the replay pool shares no task seed and no judge prompt with the "
                   "held-out answers (prompt), or no task seed only (seed: a diagnostic; the "
                   "pool then holds judge inputs of held-out answers)")
    p.add_argument("--judge-reference", action="store_true",
                   help="the judge's prompt carries the correct result (SolverJudge's "
                   "judge_sees_reference): a reference-guided trainable judge")
    p.add_argument("--reuse-solver", default=None,
                   help="own-answers: take the starting solver and its training and held-out "
                   "answers from this warm-start cache (same solver settings), re-render "
                   "their judge prompts for this run and SFT a fresh judge on them")
    p.add_argument("--truth-weight", type=float, default=0.0,
                   help="solver reward = (1 - w) * verdict + w * ground truth")
    p.add_argument("--eval-seeds", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    Path(args.run_dir, "summary.json").write_text(json.dumps(result, indent=1))
    s, f = result["start"], result["final"]
    print(f"held-out (greedy, {args.eval_seeds} seeds), step 0 -> step {result['steps']}:")
    for label, key in (("judge accuracy", "eval/judge/success"),
                       ("judge false-positive rate", "eval/judge_stats/false_positive_rate"),
                       ("judge false-negative rate", "eval/judge_stats/false_negative_rate"),
                       ("solver true accuracy", "eval/solver/success"),
                       ("solver judged correct", "eval/solver/reward")):
        print(f"  {label:27s} {s.get(key, float('nan')):.3f} -> {f.get(key, float('nan')):.3f}")
    for row in result["judge_heldout"]:
        print(f"  judge on the starting solver's held-out answers, step {row['step']:3d}: "
              f"accuracy {row['accuracy']:.3f}, balanced "
              f"{row.get('balanced_accuracy', float('nan')):.3f}, false-positive rate "
              f"{row.get('false_positive_rate', float('nan')):.3f}, false-negative rate "
              f"{row.get('false_negative_rate', float('nan')):.3f}")
    for row in result["replay_pool_judge"]:
        print(f"  judge on {row['answers']:.0f} replay-pool answers (trained on), step "
              f"{row['step']:3d}: accuracy {row['accuracy']:.3f}, balanced "
              f"{row.get('balanced_accuracy', float('nan')):.3f}")
    if result["judge_heldout_paired"]:
        print(f"  the same held-out answers, step 0 -> end: "
              f"{json.dumps(result['judge_heldout_paired'])}")
    print(f"train (first/last fifth of steps): {json.dumps(result['train_first'])} -> "
          f"{json.dumps(result['train_last'])}")
    print(f"seconds: {result['seconds']:.0f} wall, {result['cpu_seconds']:.0f} CPU (this "
          f"process); metrics: {Path(args.run_dir) / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
