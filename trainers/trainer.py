"""``Trainer``: async multi-LLM RL — one TrainEngine + engine pool per trainable policy.

The loop (``afit``) reads top to bottom: set up policies, start the rollout controller, then
per step take a batch per trainable policy, compute advantages, train, push weights
(pause -> update -> version + 1 -> resume), log, evaluate, checkpoint.

Where each part lives: ``trainer_setup.py`` (models, engines, gateway), ``rollouts.py``
(training and evaluation episodes), ``train_policy.py`` (one policy's train step),
``clocks.py`` (which policies train at each global step), ``trainer_state.py`` (checkpoints).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from areal_agents.agent import Agent
from areal_agents.algorithms import check_group_size
from areal_agents.algorithms.reward_levels import resolve_reward_levels
from areal_agents.engines.base import InferenceEngine
from areal_agents.errors import ConfigError
from areal_agents.league.pool import OpponentPool
from areal_agents.metrics import Logger, Progress, Startup, make_logger
from areal_agents.rewards.hooks import GroupRewardFn, RewardHooks
from areal_agents.samples import Sample

from .affinity import check_cpus
from .checkpointing import TrainerState
from .clocks import check_clock, run_independent, run_lockstep, stop_task
from .critic import CriticEngine
from .episodes import RewardFn
from .league import League
from .llm_session import Seat, open_seat
from .lora_policies import check_adapter_policies
from .policy import Policy
from .ray_launcher import resolve_launcher
from .rollouts import evaluate, train_episode
from .sample_log import SampleLog
from .stats import StepStats, resolve_algorithm
from .train_policy import train_policy
from .trainer_setup import setup_trainer
from .trainer_state import (
    load_trainer_state,
    restore_trainer,
    save_trainer,
    trainer_state_dict,
)
from .weight_push import WeightPush
from .wiring import BACKENDS, backend_factory, policy_algorithm, resolve_policy_map

__all__ = ["BACKENDS", "Trainer", "backend_factory", "resolve_policy_map"]


__all__ = ["BACKENDS", "Trainer", "backend_factory", "resolve_policy_map"]


class Trainer:
    """Train one or several separately parameterised LLMs, one per agent role, in any env.

    Args:
        env: a registered env id (``aa.make(env, **env_kwargs)``) or a zero-argument factory.
        policies: ``{name: Policy}``.
        policy_map: ``{agent_id: policy}`` or ``fn(agent_id) -> policy``; several agents may
            share a policy (self-play). Agents in ``agents`` need no entry.
        agents: fixed (scripted, random, human) agents ``{agent_id: Agent}``; never trained.
        algorithm: an algorithm object (``aa.algorithms.GRPO()``) or a name ("grpo", "dapo"...).
            With ``kl_coef > 0`` (``needs_reference``) each trainable policy keeps a frozen
            reference engine — its initial weights, after the warm start — whose log-probs
            set ``batch.ref_logprobs``; logged as ``policy/<name>/kl``. The reference is saved
            once to ``run_dir/checkpoints/reference/<name>.pt`` and reloaded on resume.
        batch_size: episodes per train step of each trainable policy (multiple of group_size).
        group_size: episodes per task seed (the GRPO group).
        max_staleness: versions a sample may lag; 0 is synchronous (``Policy.max_staleness``
            overrides it for one policy).
        max_concurrent: episodes in flight at most (default ``2 * batch_size``).
        eval_every, eval_seeds: greedy evaluation every k steps on these seeds, and once before
            the first step of a fresh run (logged as step 0; 0 = never).
        reward_fns: extra rewards ``fn(episode) -> float | {agent: float}``, sync or async
            (e.g. ``aa.rewards.RubricJudge``); a judge's ``policy`` is served even when no
            agent acts with it (it must then be frozen), and its calls are not trained on.
        reward_levels: per role, ``{agent_id: {"process": w, "agent": w, "team": w}}``: train
            that agent on the weighted sum of the reward levels its env reports per step
            (``info["reward_levels"]``) instead of the env's scalar reward; a level left out
            weighs 1 (``areal_agents.algorithms.reward_levels``). Each level's total is
            logged per agent (``train/<agent>/reward_<level>``) whether weighted or not.
        group_reward_fns: rewards of a whole group, ``fn(episodes) -> [float | {agent:
            float}]`` (e.g. ``aa.rewards.GroupJudge``), run once per finished training group
            before filtering and advantages; not run on evaluation episodes.
        checkpoint_every, run_dir, resume, keep_checkpoints: checkpoints in
            ``run_dir/checkpoints`` (layout: ``areal_agents.trainers.checkpointing``) every
            ``checkpoint_every`` steps (0 = none) and, with ``run_dir``, always at the end of
            ``afit`` (the final weights; skipped when that step was just saved);
            ``resume`` continues from the latest complete one (a fresh run when there is
            none), skipping the warm start; ``keep_checkpoints`` keeps only the newest k
            (None: all). With ``max_staleness=0`` a resumed run reproduces the uninterrupted
            run's batches and metrics: each episode samples with seeds keyed by (seed, task
            seed, member, agent); bitwise with ``generation_batch_size=1``.
        seed: first task seed (training seeds count up from it) and RNG seed.
        warm_start: ``{"episodes": n, "players": {agent_id: "random" | player}}``: format-only
            SFT for ``Policy.sft_steps`` steps before RL (None = off). A demo episode whose
            env or player raises is skipped and counted (``warm_start/<policy>/failed_episodes``);
            fewer than ``"min_episodes"`` finished ones (default ``n / 2``) is a ``TrainError``.
        max_steps_per_episode: end an episode after this many env steps (None: when the env
            ends it). ``1`` with ``api="completions"`` policies (no tool rounds) makes each
            agent's session single-turn: its engine keeps no keys/values for a follow-up (the
            prefix-cache copy is skipped; tokens and log-probs unchanged).
        torch_threads: ``torch.set_num_threads`` for this process.
        cpus: pin this (the controller's) process to these CPU ids at ``setup`` (Linux
            ``sched_setaffinity`` on all its threads, ``trainers/affinity.py``; torch threads
            then ``min(torch_threads, len(cpus))``). Threads and processes started later inherit
            the set, as under ``taskset``, unless their placement names its own
            (``Policy.train.cpus`` for train workers); the process stays pinned after
            ``aclose``. ``None`` (default): not pinned.
        generation_batch_size: rows per batch of each policy's in-process inference engine
            (default ``max(32, max_concurrent)``). Batched CPU kernels round differently for
            different batch shapes, so behaviour log-probs of two runs differ by ~1e-7 (Adam
            then amplifies it); ``1`` makes generation bitwise reproducible (slower).
        partial_groups: 0 (default) trains whole groups only; ``k >= 1`` trains a group with
            the >= k members already done when its stragglers would make it too stale (see
            ``RolloutController``): more throughput under a long tail, biased to shorter outputs.
        logger, progress: metrics sink (default from ``run_dir``) and the rich progress bar
            (with ``progress``, the start-up phases and their times go to stderr too).
        record_samples: trained samples kept per policy per step in
            ``run_dir/samples/step_<n>.jsonl`` for ``areal-agents view RUN_DIR`` (0 = off;
            ``areal_agents.trainers.sample_log``), written by a background thread off the
            train step and the event loop; complete when ``afit`` returns.
        clock: ``"lockstep"`` (default): each global step trains every due policy together
            (``Policy.train_every``); ``"independent"``: each policy trains as soon as its own
            batch is ready and every policy step is a global step (``fit(steps)`` is then a
            budget of policy steps). Both log ``policy/<name>/step``; see
            ``areal_agents.trainers.clocks`` for the contracts (lockstep keeps the bitwise
            sync resume).
        opponents: an ``OpponentPool``: each training episode puts one drawn pool member
            (a snapshot of a trained policy, a scripted player, a frozen or external policy)
            in the opponent's seat, never trained (``areal_agents.trainers.league``).
        launcher: where worker groups and engine servers run: ``"local"`` (default: this
            machine), ``"ray"``, a ``{kind: ray, ...}`` mapping or a ``RayLauncher`` (Ray
            placement groups and auto-scaled replicas; ``trainers/ray_launcher.py``).

    Raises:
        ValueError / ConfigError: inconsistent arguments (the message names the field).

    Example:
        >>> trainer = aa.Trainer(env="Signaling-v0", policies={"s": aa.Policy(lr=1e-3),
        ...     "l": aa.Policy(lr=1e-3)}, policy_map={"speaker": "s", "listener": "l"})
        ...     # doctest: +SKIP
        >>> trainer.fit(100)  # doctest: +SKIP
    """

    def __init__(self, *, env: str | Callable[[], Any], policies: Mapping[str, Policy],
                 policy_map: Mapping[str, str] | Callable[[str], str],
                 agents: Mapping[str, Agent] | None = None, algorithm: Any = "grpo",
                 batch_size: int = 32, group_size: int = 16, max_staleness: int = 0,
                 max_concurrent: int | None = None, eval_every: int = 0,
                 eval_seeds: range | list[int] = range(1_000_000, 1_000_064),
                 reward_fns: list[RewardFn] | None = None, checkpoint_every: int = 0,
                 group_reward_fns: list[GroupRewardFn] | None = None,
                 run_dir: str | Path | None = None, resume: bool = False, seed: int = 0,
                 warm_start: dict[str, Any] | None = None, env_kwargs: dict[str, Any] | None = None,
                 torch_threads: int | None = 1, cpus: Sequence[int] | None = None,
                 logger: Logger | None = None,
                 record_samples: int = 2,
                 progress: bool = True, max_steps_per_episode: int | None = None,
                 generation_batch_size: int | None = None, clock: str = "lockstep",
                 keep_checkpoints: int | None = None, partial_groups: int = 0,
                 opponents: OpponentPool | None = None, launcher: Any = "local",
                 reward_levels: Mapping[str, Mapping[str, float]] | None = None) -> None:
        if batch_size < 1 or group_size < 1 or batch_size % group_size:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of "
                              f"group_size ({group_size})")
        if (checkpoint_every or resume) and run_dir is None:
            raise ConfigError("checkpoint_every/resume need run_dir= (where checkpoints live)")
        self.make_env = self._env_factory(env, env_kwargs or {})
        try:
            probe = self.make_env()
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:  # the env refused its arguments
            raise ConfigError(f"the env {env!r} could not be built with env_kwargs="
                              f"{env_kwargs or {}!r}: {exc}; fix env_kwargs") from exc
        possible = list(getattr(probe, "possible_agents", ["agent"]))
        self.policies = dict(policies)
        check_adapter_policies(self.policies)  # adapter_of: trainers/lora_policies.py
        self.fixed_agents = dict(agents or {})
        self.policy_of = resolve_policy_map(policy_map, possible, self.policies, self.fixed_agents)
        self.trainable = sorted({p for p in self.policy_of.values() if self.policies[p].trainable})
        if not self.trainable:
            raise ConfigError("no trainable policy is used by policy_map; every policy is frozen")
        self.algorithm = resolve_algorithm(algorithm)
        self.algorithms = {p: policy_algorithm(self.algorithm, self.policies[p], p)
                           for p in self.trainable}  # per-policy overrides (own objects)
        for algo in self.algorithms.values():  # groups of one would zero every advantage
            check_group_size(algo, group_size)
        for p in self.trainable:  # a critic needs an algorithm with a value loss (PPO)
            if self.policies[p].critic is not None and not hasattr(self.algorithms[p],
                                                                   "value_loss"):
                raise ConfigError(f"policies.{p}.critic needs algorithm='ppo' (an algorithm with "
                                  f"value_loss and GAE); got {type(self.algorithms[p]).__name__}"
                                  "; drop the critic or use PPO")
        self.batch_size, self.group_size, self.max_staleness = batch_size, group_size, max_staleness
        self.max_concurrent = max_concurrent or 2 * batch_size
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ConfigError(f"generation_batch_size must be >= 1, got {generation_batch_size}")
        self.generation_batch_size = generation_batch_size or max(32, self.max_concurrent)
        if not 0 <= partial_groups <= group_size:
            raise ConfigError(f"partial_groups must be in 0..group_size={group_size} (0 = off), "
                              f"got {partial_groups}")
        self.partial_groups = partial_groups
        self.train_every = {p: self.policies[p].train_every for p in self.trainable}
        self.clock = check_clock(clock, self.train_every)
        self.eval_every, self.eval_seeds = eval_every, list(eval_seeds)
        self.reward_fns = list(reward_fns or [])
        self.reward_levels = resolve_reward_levels(reward_levels, possible)
        self.rewards = RewardHooks(self.reward_fns, group_reward_fns or [], self.policies,
                                   self.policy_of.values(), partial_groups)  # judges' wiring
        self.checkpoint_every, self.resume, self.seed = checkpoint_every, resume, seed
        if keep_checkpoints is not None and keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1 (or None: keep all), got "
                              f"{keep_checkpoints}")
        self.keep_checkpoints = keep_checkpoints
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.warm_start, self.torch_threads = warm_start, torch_threads
        self.cpus = None if cpus is None else check_cpus("cpus", cpus)
        self.max_steps_per_episode = max_steps_per_episode
        self.logger = logger if logger is not None else make_logger(self.run_dir)
        self.show_progress = progress
        self.startup = Startup(enabled=progress)  # start-up phases on stderr
        self.sample_log = SampleLog(self.run_dir, record_samples)  # for `areal-agents view`
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.trained_seeds: list[list[int]] = []  # per step: task seeds of the groups trained
        self._step_seeds: dict[str, list[int]] = {}  # per policy: seeds of its last batch
        self.gateway: Any = None
        self.train_engines: dict[str, Any] = {}
        self.lora_bases: dict[str, Any] = {}  # base policy -> SharedLoRABase (lora_policies.py)
        self.served_bases: dict[str, Any] = {}  # vLLM base -> its served copy, until trained on
        self.ref_engines: dict[str, Any] = {}  # frozen KL references (algorithm.needs_reference)
        self.critics: dict[str, CriticEngine] = {}  # learned values (Policy.critic, PPO)
        self.tokenizers: dict[str, Any] = {}
        self.weight_pushes: dict[str, WeightPush] = {}  # per trainable policy (weight_push.py)
        self._stats = StepStats()
        self.league = League(opponents, env if isinstance(env, str) else None)  # null w/o pool
        self.launcher = resolve_launcher(launcher)  # LocalLauncher: a null object
        self.league.check(self, possible)

    @staticmethod
    def _env_factory(env: str | Callable[[], Any], kwargs: dict[str, Any]) -> Callable[[], Any]:
        if isinstance(env, str):
            from areal_agents.registration import make

            return lambda: make(env, **kwargs)
        return env

    # ---- setup ----------------------------------------------------------------------------

    async def setup(self) -> None:
        """Build models, train engines, KL references, inference engines and the gateway, then
        restore the latest checkpoint when ``resume`` (idempotent; ``trainer_setup.py``).

        A resumed run skips the SFT warm start (the checkpoint holds the trained weights and
        ``checkpoints/reference`` the KL references).
        """
        if self.gateway is None:
            await setup_trainer(self)

    # ---- episodes -------------------------------------------------------------------------

    async def _open_seat(self, agent_id: str, policy: str, greedy: bool,
                         seed_key: str | None = None) -> Seat:
        # one env step and raw-text completions (no tool rounds): each agent calls its LLM
        # once, so its engine need not keep the keys/values for a follow-up
        single_turn = (self.max_steps_per_episode == 1
                       and self.policies[policy].api == "completions")
        return await open_seat(self.gateway, self._client, self.policies[policy], policy,
                               agent_id, greedy, seed_key=seed_key, single_turn=single_turn)

    async def _episode(self, seed: int, member: int) -> dict[str, list[Sample]]:
        """One training episode; agent ``a`` samples with seeds keyed by ``(self.seed, seed,
        member, a)`` so a replayed episode (after a resume) draws the same tokens."""
        return await train_episode(self, seed, member)

    def _filter(self, policy: str, samples: list[Sample]) -> tuple[list[Sample], dict[str, int]]:
        return self.algorithms[policy].filter(samples)

    # ---- training -------------------------------------------------------------------------

    async def _train_policy(self, name: str) -> dict[str, float]:
        """One train step of policy ``name`` (``train_policy.py``); its metrics."""
        return await train_policy(self, name)

    async def afit(self, steps: int) -> list[dict[str, float]]:
        """Train until ``self.step == steps`` (global steps of ``clock``: ``trainers/clocks.py``);
        returns the logged metrics of each step. Raises what the rollout controller's loop
        failed with, if training itself did not fail (then that failure propagates)."""
        await self.setup()
        first: dict[str, float] = {}
        if self.eval_every and self.step == 0 and steps > 0:
            # the starting point (after any warm start), logged as step 0 before rollouts begin
            with self.startup.phase(f"step-0 evaluation on {len(self.eval_seeds)} seeds"):
                first = await self.evaluate()
            self.logger.log(0, first)
        self._bar = Progress(steps, self._headline(), enabled=self.show_progress, start=self.step)
        self._bar.update(self.step, first)
        runner = asyncio.create_task(self.controller.run())
        start, self._saved_at = self.step, None
        try:
            if self.clock == "lockstep":
                await run_lockstep(self.train_every, start=start, steps=steps,
                                   train=self._train_policy, on_step=self._end_step,
                                   on_barrier=self._checkpoint)
            else:
                await run_independent(self.trainable, start=start, steps=steps,
                                      barrier_every=self.checkpoint_every,
                                      wait_ready=self._wait_ready, train=self._train_policy,
                                      on_step=self._end_step, on_barrier=self._checkpoint)
            if self.run_dir is not None and self.step > start and self._saved_at != self.step:
                await self.save_checkpoint()  # the final weights, for `eval RUN_DIR` and resume
            await asyncio.to_thread(self.sample_log.drain)  # the recorded samples are on disk
        finally:
            self._bar.close()
            await self.controller.stop()
            runner_error = await stop_task(runner)
        if runner_error is not None:
            raise runner_error
        return self.history

    async def _wait_ready(self, names: list[str]) -> list[str]:
        controls = self.controller.controls
        return await self.controller.wait_ready({p: controls[p].batch_size for p in names})

    async def _end_step(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Log global step ``step``: the trained policies' metrics, every policy's step
        (``policy/<name>/step``, its version), episodes, outcomes and the due evaluation."""
        self.step = step
        await self.launcher.on_step_end(self)  # replica counts to their targets, between steps
        self.trained_seeds.append(sorted({s for p in results for s in self._step_seeds.pop(p)}))
        metrics: dict[str, float] = {k: v for r in results.values() for k, v in r.items()}
        metrics.update({f"policy/{p}/step": float(c.version)
                        for p, c in self.controller.controls.items()})
        metrics.update(self._stats.episode_metrics(pending=set(self.controller.pending)))
        metrics.update(self._stats.outcome_metrics(self.controller.counts()))
        metrics.update(self.rewards.metrics(metrics))  # judge calls, tokens, failures
        self.rewards.forget(self.controller.pending)
        if self.eval_every and self.step % self.eval_every == 0:
            metrics.update(await self.evaluate())
        self.logger.log(self.step, metrics)
        self.sample_log.submit(step, results)  # staged samples: written by a background thread
        self.history.append({"step": self.step, **metrics})
        self._bar.update(self.step, metrics)

    async def _checkpoint(self, step: int) -> None:
        """Every clock is stopped at global step ``step``: save if it is on the grid."""
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            await self.save_checkpoint()
            self._saved_at = step

    def fit(self, steps: int) -> list[dict[str, float]]:
        """Synchronous ``afit`` (runs its own event loop)."""
        return asyncio.run(self.afit(steps))

    def _headline(self) -> list[str]:
        agents = sorted(self.policy_of)
        return [f"train/{a}/success" for a in agents] + [f"eval/{a}/success" for a in agents]

    # ---- evaluation -----------------------------------------------------------------------

    async def evaluate(self, seeds: list[int] | None = None, *,
                       opponents: list[str] | None = None,
                       seats: list[str] | None = None) -> dict[str, float]:
        """Greedy episodes on held-out ``seeds``: ``eval/<agent>/{reward,success}`` (with an
        ``OpponentPool``: also ``pool/*`` and, when due, ``league/<player>/elo``).

        With ``opponents`` (scripted player names, frozen or snapshot policy names) the
        trainer's policies play each of them instead, the opponent in each of ``seats``
        (default: every seat): ``eval/<agent>/vs/<opponent>/{win,draw,loss,reward}``.
        """
        await self.setup()
        seeds = self.eval_seeds if seeds is None else seeds
        if opponents is not None:
            return await self.league.evaluate_vs(self, opponents, seats, seeds)
        return await evaluate(self, seeds)

    def _repr_html_(self) -> str:
        """The step, each agent's policy (trained or frozen) and the last metrics, for notebooks."""
        import html

        agents = "".join(
            f"<tr><td>{html.escape(str(a))}</td><td>{html.escape(p)}</td>"
            f"<td>{'trained' if p in self.trainable else 'frozen'}</td></tr>"
            for a, p in sorted(self.policy_of.items()))
        last = self.history[-1] if self.history else {}
        metrics = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
                          for k, v in sorted(last.items())
                          if k != "step" and isinstance(v, int | float))
        return (f"<div><b>Trainer</b> step {self.step}, algorithm "
                f"{html.escape(type(self.algorithm).__name__)}<table><tr><th>agent</th>"
                f"<th>policy</th><th></th></tr>{agents}</table>"
                f"<table><tr><th>last metric</th><th>value</th></tr>{metrics}</table></div>")

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> TrainerState:
        """Everything but the engines' weights a resumed run needs (JSON-ready): step,
        controller state, history, trained seeds and each policy's algorithm state."""
        return trainer_state_dict(self)

    def load_state_dict(self, state: TrainerState) -> None:
        """Restore ``state_dict()`` output into a set-up trainer; each train engine's version
        becomes its policy's restored version."""
        load_trainer_state(self, state)

    async def save_checkpoint(self) -> Path:
        """Write engines + ``state_dict()`` to ``run_dir/checkpoints/step_<n>``; returns the
        dir (see ``areal_agents.trainers.checkpointing`` for the layout and atomicity)."""
        return await save_trainer(self)

    async def restore_checkpoint(self, ckpt: Path) -> None:
        """Load checkpoint ``ckpt`` into the set-up trainer: engines, state, the served
        weights, RNG states (last) and ``metrics.jsonl`` cut back to the restored step."""
        await restore_trainer(self, ckpt)

    async def add_replica(self, policy: str, engine: InferenceEngine) -> int:
        """Serve ``engine`` as one more replica of trainable ``policy`` (a late joiner or a
        replacement); returns its index. It receives the current weights and version through
        the policy's transport before it takes traffic (``Gateway.add_replica``). Call it
        between steps: a push in flight does not wait for it.

        Raises:
            KeyError: ``policy`` is not a trainable policy of this run.
        """
        await self.setup()
        if policy not in self.train_engines:
            raise KeyError(f"{policy!r} is not a trainable policy; trainable: "
                           f"{sorted(self.train_engines)}")
        train = self.train_engines[policy]
        update = await self.weight_pushes[policy].update(train, train.version)
        return await self.gateway.add_replica(policy, engine, weights=update)

    async def aclose(self) -> None:
        """Close the gateway (and its engines) and the train engines. Idempotent."""
        if self.gateway is not None:
            await self.gateway.close()
        for push in self.weight_pushes.values():
            push.close()
        for engine in self.train_engines.values():
            engine.close()
        for engine in [*self.ref_engines.values(), *self.critics.values()]:
            engine.close()
        self.train_engines.clear()
        self.ref_engines.clear()
        self.critics.clear()
        await self.launcher.close()
        self.logger.close()
        self.sample_log.close()  # waits for the last recorded samples
