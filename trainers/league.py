"""The trainer's side of opponent pools and leagues: snapshots, per-episode draws, league games.

``League`` is held by every ``Trainer`` (a null object without a pool: ``match`` then returns
the trainer's own seats and nothing is drawn or recorded). With an ``OpponentPool`` it

* serves the pool's frozen policies and its snapshots (``"<policy>@<version>"``: a fresh model
  with the train engine's exported weights, an in-process ``LocalEngine``, a frozen ``Policy``
  entry in ``trainer.policies``) and evicts the oldest beyond ``max_snapshots``;
* draws each training episode's opponent seat and member (``Match``), keyed by the task seed,
  and counts the learner's results per member (the PFSP statistics);
* plays greedy games against named opponents (``evaluate_vs``) and the league: every player
  against every other in both seats (``play_league``: win/draw/loss matrix and Elo), written
  to ``run_dir/league/step_<n>.json``.

Checkpoints: ``state_dict`` holds the snapshot list and the member statistics; a snapshot's
weights are written once, when it is taken, to ``run_dir/league/snapshots/<name>.pt`` (kept
after eviction, so an older checkpoint can still be resumed) and served again on resume.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from areal_agents.agent import Agent
from areal_agents.episode import Episode
from areal_agents.errors import ConfigError
from areal_agents.league.elo import fit_elo
from areal_agents.league.players import RANDOM, resolve_player, scripted_agent
from areal_agents.league.pool import OpponentPool
from areal_agents.league.sampling import MemberRecord, draw_index, member_weights, unit_float

from .episodes import EpisodeStats, play
from .placement import InferencePlacement, TrainPlacement
from .serving import build_engines
from .warm_start import copy_weights_into

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["League", "Match", "outcome_of"]

OUTCOMES = ("win", "draw", "loss")


def outcome_of(returns: dict[str, float], seat: str, other: str) -> str:
    """``"win"`` / ``"draw"`` / ``"loss"`` of ``seat`` by comparing its env return with
    ``other``'s (TicTacToe's illegal-move loss, -1 vs 0, is a loss; a PD round of mutual
    defection a draw)."""
    a, b = returns.get(seat, 0.0), returns.get(other, 0.0)
    return "win" if a > b else "loss" if a < b else "draw"


@dataclass
class Match:
    """One episode's seating: who plays with which policy, which seat the opponent has.

    ``reward_fns`` (prepend them to the trainer's) record the learner's result against
    ``member``; ``close`` releases the member's engine (an evicted snapshot closes after its
    last game). Without a pool ``opponent_seat`` and ``member`` are None.
    """

    policy_of: dict[str, str]
    fixed_agents: dict[str, Agent]
    opponent_seat: str | None = None
    member: str | None = None
    returns: dict[str, float] = field(default_factory=dict)
    reward_fns: list[Callable[[Episode], float]] = field(default_factory=list)
    close: Callable[[], None] = lambda: None

    def learner_stats(self, stats: EpisodeStats) -> EpisodeStats:
        """``stats`` without the opponent's seat (the train metrics describe the learner)."""
        if self.opponent_seat is None:
            return stats
        drop = self.opponent_seat
        return dataclasses.replace(
            stats, returns={a: r for a, r in stats.returns.items() if a != drop},
            success={a: r for a, r in stats.success.items() if a != drop},
            gen_lengths={a: n for a, n in stats.gen_lengths.items() if a != drop})


class League:
    """A trainer's opponent pool at run time (see the module docstring).

    Args:
        pool: the configuration, or None (a null league).
        env_id: the env's registered id (resolves short player names), if any.
    """

    def __init__(self, pool: OpponentPool | None, env_id: str | None = None) -> None:
        self.pool, self.env_id = pool, env_id
        self.scripted: dict[str, str] = {}  # member -> resolved player name
        self.frozen: list[str] = []  # members that are policies of the trainer
        self.snapshots: list[str] = []  # served snapshot policies, oldest first
        self.records: dict[str, MemberRecord] = {}
        self.sources: list[str] = []  # the snapshotted policies
        self.seats: list[str] = []  # seats the opponent may take
        self.agents: list[str] = []  # the env's possible agents
        self._drawn: dict[int, tuple[str, str]] = {}
        self._in_use: dict[str, int] = {}
        self._evicted: set[str] = set()
        self._served = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- configuration --------------------------------------------------------------------

    def check(self, trainer: Trainer, possible_agents: Sequence[str]) -> None:
        """Validate the pool against the trainer's policies and the env's agents.

        Raises:
            ConfigError: an unknown member or seat, a member policy that is trainable, or an
                ambiguous ``snapshot_of`` (the message names the field and the choices).
        """
        self.agents = list(possible_agents)
        pool = self.pool
        if pool is None:
            return
        for member in pool.members:
            if member in trainer.policies:
                if trainer.policies[member].trainable:
                    raise ConfigError(f"OpponentPool.members: policy {member!r} is trainable; "
                                      "pool members are frozen (set frozen=True)")
                self.frozen.append(member)
            else:
                try:
                    self.scripted[member] = resolve_player(member, self.env_id)
                except ValueError as exc:
                    raise ConfigError(f"OpponentPool.members: {exc}, or a frozen policy of "
                                      f"{sorted(trainer.policies)}") from None
        learners = [a for a in possible_agents if a in trainer.policy_of
                    and trainer.policies[trainer.policy_of[a]].trainable]
        if pool.seat == "any":
            self.seats = learners
        elif pool.seat in learners:
            self.seats = [pool.seat]
        else:
            raise ConfigError(f"OpponentPool.seat={pool.seat!r}: choose 'any' or an agent whose "
                              f"policy is trainable: {learners} (possible agents "
                              f"{list(possible_agents)})")
        if len(possible_agents) != 2:
            raise ConfigError(f"OpponentPool plays two-player envs; this env has agents "
                              f"{list(possible_agents)}")
        if pool.snapshot_every:
            sources = ([pool.snapshot_of] if isinstance(pool.snapshot_of, str) else
                       list(pool.snapshot_of or sorted({trainer.policy_of[a] for a in self.seats})))
            bad = sorted(set(sources) - set(trainer.trainable))
            if bad or not sources:
                raise ConfigError(f"OpponentPool.snapshot_of={pool.snapshot_of!r}: name "
                                  f"trainable policies among {trainer.trainable}")
            self.sources = sources
        self.records = {m: MemberRecord() for m in pool.members}

    @property
    def members(self) -> list[str]:
        """Drawable members, oldest first: the configured ones, then the live snapshots."""
        return ([] if self.pool is None else list(self.pool.members)) + self.snapshots

    def members_for(self, trainer: Trainer, seat: str) -> list[str]:
        """The members that may take ``seat``: the configured ones, and the snapshots of the
        policy that plays ``seat`` (with separate parameters per seat, each seat's opponent is
        a past version of that seat's own policy)."""
        own = trainer.policy_of.get(seat)
        return [m for m in self.members if m not in self.snapshots
                or m.rsplit("@", 1)[0] == own]

    # ---- serving --------------------------------------------------------------------------

    async def setup(self, trainer: Trainer, resumed: bool) -> None:
        """Serve the frozen member policies and (fresh runs) snapshot version 0."""
        if self.pool is None or self._served:
            return
        self._served = True
        for name in self.frozen:
            policy = trainer.policies[name]
            if policy.endpoint is None and name not in trainer.gateway.policies:
                model, tokenizer = policy.load()
                await self._serve(trainer, name, policy, model, tokenizer)
        if not resumed:
            for source in self.sources:
                await self.snapshot(trainer, source, 0)

    async def _serve(self, trainer: Trainer, name: str, policy: Any, model: Any,
                     tokenizer: Any) -> None:
        engines = await build_engines(name, InferencePlacement(), model.eval(), tokenizer, None,
                                      max_batch_size=trainer.generation_batch_size)
        trainer.gateway.add_policy(name, engines, tokenizer, tool_parser=policy.tool_parser)

    async def snapshot(self, trainer: Trainer, source: str, version: int,
                       path: Path | None = None) -> str:
        """Serve ``source``'s current train weights (or the file ``path``) as frozen policy
        ``"<source>@<version>"`` and add it to the pool (evicting the oldest beyond
        ``max_snapshots``); returns its name."""
        assert self.pool is not None
        name = f"{source}@{version}"
        policy = trainer.policies[source]
        model, tokenizer = policy.load()
        if isinstance(policy.model, tuple):  # load() hands out the very objects: copy them
            model = copy.deepcopy(model)
        if path is not None:
            model.load_state_dict(torch.load(path, map_location="cpu"))
        else:
            copy_weights_into(model, trainer.train_engines[source].export_weights())
            if trainer.run_dir is not None:
                out = trainer.run_dir / "league" / "snapshots" / f"{name}.pt"
                out.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), out)
        trainer.policies[name] = dataclasses.replace(
            policy, frozen=True, train=TrainPlacement(), inference=InferencePlacement())
        await self._serve(trainer, name, policy, model, tokenizer)
        self.snapshots.append(name)
        self.records.setdefault(name, MemberRecord())
        mine = [n for n in self.snapshots if n.rsplit("@", 1)[0] == source]
        for old in mine[:max(0, len(mine) - self.pool.max_snapshots)]:
            self.snapshots.remove(old)
            await self._evict(trainer, old)
        return name

    async def _evict(self, trainer: Trainer, name: str) -> None:
        self._evicted.add(name)
        self.records.pop(name, None)
        if not self._in_use.get(name):
            await self._close(trainer, name)

    async def _close(self, trainer: Trainer, name: str) -> None:
        served = trainer.gateway.policies.pop(name, None)
        trainer.policies.pop(name, None)
        self._evicted.discard(name)
        if served is not None:
            for engine in served.router.engines:
                await engine.close()

    async def after_train(self, trainer: Trainer, policy: str, version: int) -> None:
        """Snapshot ``policy`` when it is the pool's source and ``version`` is due."""
        if (self.pool is not None and policy in self.sources
                and version % self.pool.snapshot_every == 0):
            await self.snapshot(trainer, policy, version)

    # ---- per-episode draw -----------------------------------------------------------------

    def match(self, trainer: Trainer, seed: int, env: Any) -> Match:
        """The seating of training episode ``seed`` (the same for every member of its group)."""
        if self.pool is None:
            return Match(dict(trainer.policy_of), dict(trainer.fixed_agents))
        if seed not in self._drawn:
            if len(self._drawn) > 4096:  # groups long done
                self._drawn.pop(next(iter(self._drawn)))
            key = f"{trainer.seed}/{seed}"
            seat = self.seats[int(unit_float(key + "/seat") * len(self.seats))]
            members = self.members_for(trainer, seat)
            weights = member_weights([self.records[m] for m in members], self.pool.sampling,
                                     latest_share=self.pool.latest_share,
                                     pfsp_power=self.pool.pfsp_power)
            self._drawn[seed] = (seat, members[draw_index(key + "/member", weights)])
        seat, member = self._drawn[seed]
        return self.seat_match(trainer, env, member, seat, record=True)

    def seat_match(self, trainer: Trainer, env: Any, member: str, seat: str,
                   record: bool = False) -> Match:
        """``member`` in ``seat`` of ``env``, the trainer's policies in the other seats."""
        policy_of = {a: p for a, p in trainer.policy_of.items() if a != seat}
        fixed = {a: g for a, g in trainer.fixed_agents.items() if a != seat}
        if member in self.scripted or member == RANDOM:
            fixed[seat] = scripted_agent(self.scripted.get(member, member), env, seat)
        elif member in trainer.policies:
            policy_of[seat] = member
        else:
            raise ValueError(f"unknown opponent {member!r}; pool members {self.members}, "
                             f"policies {sorted(trainer.policies)}")
        self._in_use[member] = self._in_use.get(member, 0) + 1
        other = next(a for a in [*policy_of, *fixed] if a != seat)
        match = Match(policy_of, fixed, seat, member)

        def capture(episode: Episode) -> float:
            match.returns = dict(episode.returns)
            if record and member in self.records and self.pool is not None:
                self.records[member].add(outcome_of(match.returns, other, seat), self.pool.decay)
            return 0.0

        def close() -> None:
            self._in_use[member] -= 1
            if member in self._evicted and not self._in_use[member]:
                task = asyncio.get_running_loop().create_task(self._close(trainer, member))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        match.reward_fns, match.close = [capture], close
        return match

    def metrics(self) -> dict[str, float]:
        """``pool/<member>/{p_loss,games}`` and ``pool/size``."""
        out = {"pool/size": float(len(self.members))}
        for m, r in self.records.items():
            out[f"pool/{m}/p_loss"], out[f"pool/{m}/games"] = r.p_loss, r.games
        return out

    # ---- evaluation -----------------------------------------------------------------------

    async def _game(self, trainer: Trainer, seats: dict[str, str], seed: int) -> dict[str, float]:
        """One greedy game, ``seats = {agent_id: player}``; the env returns per agent."""
        env = trainer.make_env()
        policy_of: dict[str, str] = {}
        fixed: dict[str, Agent] = {}
        for agent, player in seats.items():
            if player in trainer.policies and player not in self.scripted:
                policy_of[agent] = player
            else:
                name = self.scripted.get(player) or resolve_player(player, self.env_id)
                fixed[agent] = scripted_agent(name, env, agent)
        returns: dict[str, float] = {}

        def capture(episode: Episode) -> float:
            returns.update(episode.returns)
            return 0.0

        try:
            await play(env, seed, policy_of=policy_of, fixed_agents=fixed,
                       open_seat=trainer._open_seat, reward_fns=[capture], greedy=True,
                       max_steps=trainer.max_steps_per_episode)
        finally:
            await env.close()
        return returns

    async def evaluate_vs(self, trainer: Trainer, opponents: Sequence[str],
                          seats: Sequence[str] | None, seeds: Sequence[int]) -> dict[str, float]:
        """Greedy games of the trainer's policies against each opponent in each of its
        ``seats`` (default: every agent of the trainer's policy map): metrics
        ``eval/<learner agent>/vs/<opponent>/{win,draw,loss,reward}``.

        Raises:
            ValueError: no seeds, an unknown seat or opponent.
        """
        agents = self.agents
        seats = list(seats) if seats else [a for a in agents if a in trainer.policy_of]
        bad = sorted(set(seats) - set(agents))
        learners = [next(a for a in agents if a != s) for s in seats if not bad]
        if bad or not seeds or len(agents) != 2 or set(learners) - set(trainer.policy_of):
            raise ValueError(f"evaluate(opponents=...) needs seeds, a two-agent env and opponent "
                             f"seats among {agents} whose other seat a policy plays (policy map "
                             f"{trainer.policy_of}); got seats {list(seats)}, {len(seeds)} seeds")
        out: dict[str, float] = {}
        for opponent in opponents:
            for seat in seats:
                learner = next(a for a in agents if a != seat)
                lineup = {seat: opponent, learner: trainer.policy_of[learner]}
                games = await asyncio.gather(*(self._game(trainer, lineup, s) for s in seeds))
                key = f"eval/{learner}/vs/{opponent}"
                for o in OUTCOMES:
                    out[f"{key}/{o}"] = sum(outcome_of(g, learner, seat) == o
                                            for g in games) / len(games)
                out[f"{key}/reward"] = sum(g.get(learner, 0.0) for g in games) / len(games)
        return out

    def league_players(self, trainer: Trainer) -> list[str]:
        """The league: trainable policies, snapshots, frozen members, scripted members."""
        return [*trainer.trainable, *self.snapshots, *self.frozen,
                *(m for m in (self.pool.members if self.pool else []) if m in self.scripted)]

    async def play_league(self, trainer: Trainer, players: Sequence[str] | None = None,
                          seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Every player against every other, in both seats, greedy, on ``seeds``.

        Returns:
            ``{"players", "seats", "seeds", "matrix": {a: {b: {win, draw, loss, games}}},
            "elo": {player: rating}}``; ``matrix[a][b]`` is from ``a``'s side over both
            seatings (``2 * len(seeds)`` games).
        """
        players = list(players or self.league_players(trainer))
        seeds = list(seeds if seeds is not None else (self.pool.league_seeds if self.pool
                                                      else range(2_000_000, 2_000_016)))
        first, second = self.agents
        pairs = [(a, b) for a in players for b in players if a != b]
        runs = await asyncio.gather(*(self._game(trainer, {first: a, second: b}, s)
                                      for a, b in pairs for s in seeds))
        matrix = {a: {b: dict.fromkeys([*OUTCOMES, "games"], 0.0) for b in players if b != a}
                  for a in players}
        results: list[tuple[str, str, float]] = []
        for i, (a, b) in enumerate(pairs):
            for g in runs[i * len(seeds):(i + 1) * len(seeds)]:
                o = outcome_of(g, first, second)
                matrix[a][b][o] += 1
                matrix[b][a][{"win": "loss", "loss": "win"}.get(o, o)] += 1
                matrix[a][b]["games"] += 1
                matrix[b][a]["games"] += 1
                results.append((a, b, {"win": 1.0, "draw": 0.5, "loss": 0.0}[o]))
        return {"players": players, "seats": [first, second], "seeds": seeds, "matrix": matrix,
                "elo": fit_elo(results, players)}

    async def on_evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Pool statistics, and at due steps the league (``league/<player>/elo``, JSON in
        ``run_dir/league/step_<n>.json``)."""
        if self.pool is None:
            return {}
        out = self.metrics()
        if self.pool.league_every and trainer.step % self.pool.league_every == 0:
            league = await self.play_league(trainer)
            league["step"] = trainer.step
            out.update({f"league/{p}/elo": r for p, r in league["elo"].items()})
            if trainer.run_dir is not None:
                path = trainer.run_dir / "league" / f"step_{trainer.step}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(league, indent=1))
        return out

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Snapshots (oldest first) and each member's decayed results (JSON-ready)."""
        return {"snapshots": list(self.snapshots),
                "records": {m: dataclasses.asdict(r) for m, r in self.records.items()}}

    async def restore(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """Serve the snapshots of ``state`` again from ``run_dir/league/snapshots`` and
        restore the statistics.

        Raises:
            FileNotFoundError: a snapshot's weights file is missing (names it).
        """
        if self.pool is None or not state:
            return
        assert trainer.run_dir is not None
        for name in list(self.snapshots):
            await self._close(trainer, name)
        self.snapshots = []
        for name in state.get("snapshots", []):
            path = trainer.run_dir / "league" / "snapshots" / f"{name}.pt"
            if not path.exists():
                raise FileNotFoundError(f"pool snapshot {name!r}: {path} is missing; the "
                                        "checkpoint's pool cannot be restored")
            source, version = name.rsplit("@", 1)
            await self.snapshot(trainer, source, int(version), path=path)
        self.records = {m: MemberRecord(**r) for m, r in state.get("records", {}).items()}
