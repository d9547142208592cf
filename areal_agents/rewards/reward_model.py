"""A Bradley-Terry reward model: a one-label sequence scorer trained on preference pairs.

The model is a transformers ``AutoModelForSequenceClassification`` with ``num_labels=1``
(``Qwen3ForSequenceClassification`` for the tiny models). A (prompt, response) pair is
rendered with the tokenizer's chat template and scored by the head at its *last attended
token*; position ids follow the attention mask, so a sequence scores the same alone, right-
padded or left-padded. Training minimises ``-log sigmoid(r(chosen) - r(rejected))``.

Pairs come from a JSONL file (``read_pairs``: rows ``{"prompt", "chosen", "rejected"}``,
strings or chat-message lists) or from a run's own scored episodes (``pairs_from_episodes``).
``RewardModelReward`` turns a trained model into a ``reward_fns`` entry.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from areal_agents.episode import Episode
from areal_agents.metrics import Logger, NullLogger

Conversation = str | list[dict[str, Any]]
"""A prompt or response: plain text (one user / assistant message) or chat messages."""


@dataclass(frozen=True)
class PreferencePair:
    """``chosen`` is a better response to ``prompt`` than ``rejected``."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation


def conversation(prompt: Conversation, response: Conversation) -> list[dict[str, Any]]:
    """Chat messages of ``prompt`` then ``response`` (text becomes a user / assistant message)."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(response, str):
        return [*head, {"role": "assistant", "content": response}]
    return [*head, *response]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over the pairs (shape ``[pairs]``).

    Example:
        >>> round(float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))), 4)
        0.6931
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class RewardModel:
    """A sequence-scoring model and its tokenizer: ``score(prompts, responses) -> rewards``.

    Args:
        model: a ``*ForSequenceClassification`` with one label and a ``score`` head
            (Llama/Qwen/Mistral style: ``model.<base_model_prefix>`` returns hidden states).
        tokenizer: its tokenizer; the chat template renders conversations when it has one.
        max_length: longer sequences keep their last ``max_length`` tokens (the response).

    Example:
        >>> rm = RewardModel.from_pretrained("tiny:xs")
        >>> len(rm.score(["1 + 1 = ?"], ["Answer: 2"]))
        1
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 512) -> None:
        if getattr(model.config, "num_labels", None) != 1 or not hasattr(model, "score"):
            raise ValueError(f"{type(model).__name__} is not a one-label sequence scorer; build "
                             "it with AutoModelForSequenceClassification(..., num_labels=1)")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.history: list[dict[str, float]] = []  # train_reward_model's eval rows
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad or 0)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_token_id

    @classmethod
    def from_pretrained(cls, spec: str | Path, *, seed: int = 0, max_length: int = 512
                        ) -> RewardModel:
        """A fresh reward model: ``"tiny:<size>[:seed=N]"`` (seeded, offline) or an HF
        checkpoint directory whose backbone is kept and whose score head is new.

        Raises:
            FileNotFoundError: not a tiny spec and no such directory.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from areal_agents.models import parse_tiny_spec
        from areal_agents.models.tiny import tiny_config, tiny_tokenizer

        tiny = parse_tiny_spec(str(spec))
        if tiny is not None:
            size, spec_seed = tiny
            state = torch.random.get_rng_state()
            try:
                torch.manual_seed(spec_seed if "seed=" in str(spec) else seed)
                model = AutoModelForSequenceClassification.from_config(
                    tiny_config(size, num_labels=1))
            finally:
                torch.random.set_rng_state(state)
            return cls(model.float().eval(), tiny_tokenizer(), max_length)
        if not Path(spec).is_dir():
            raise FileNotFoundError(f"no checkpoint at {str(spec)!r}: pass an HF checkpoint "
                                    "directory or a tiny spec such as 'tiny:xs'")
        model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1)
        return cls(model.eval(), AutoTokenizer.from_pretrained(spec), max_length)

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """A reward model written by ``save`` (or ``areal-agents train-rm --out``).

        Raises:
            FileNotFoundError: ``path`` holds no saved reward model.
        """
        meta_path = Path(path) / "reward_model.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: {path} is not a directory written "
                                    "by RewardModel.save or `areal-agents train-rm --out`")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        meta = json.loads(meta_path.read_text())
        model = AutoModelForSequenceClassification.from_pretrained(path)
        return cls(model.eval(), AutoTokenizer.from_pretrained(path), int(meta["max_length"]))

    def save(self, path: str | Path) -> Path:
        """Write model, tokenizer and ``reward_model.json`` into ``path``; returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / "reward_model.json").write_text(json.dumps({"max_length": self.max_length}))
        return path

    def encode(self, prompt: Conversation, response: Conversation) -> list[int]:
        """Token ids of the rendered conversation, cut to its last ``max_length`` tokens."""
        messages = conversation(prompt, response)
        if getattr(self.tokenizer, "chat_template", None):
            from areal_agents.gateway.chat import render

            text = render(self.tokenizer, messages, None, add_generation_prompt=False)
        else:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids[-self.max_length:]

    def pad(self, seqs: Sequence[Sequence[int]], side: Literal["right", "left"] = "right"
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``[batch, max_len]``, padded on ``side``."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
        return ids, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards ``[batch]`` (with grad): the head at each row's last attended token."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [batch, seq]
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=positions).last_hidden_state  # [batch, seq, hidden]
        width = attention_mask.shape[-1]
        last = width - 1 - attention_mask.flip(-1).argmax(-1)  # [batch] rightmost attended
        pooled = hidden[torch.arange(hidden.shape[0]), last]  # [batch, hidden]
        return self.model.score(pooled).squeeze(-1).float()

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
        """Rewards of token-id sequences, in batches, without gradients."""
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[float] = []
            for i in range(0, len(seqs), batch_size):
                out.extend(self.forward(*self.pad(seqs[i : i + batch_size])).tolist())
            return out
        finally:
            self.model.train(was_training)

    def score(self, prompts: Sequence[Conversation], responses: Sequence[Conversation],
              batch_size: int = 32) -> list[float]:
        """Rewards of ``(prompt, response)`` pairs, without gradients."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses, strict=True)],
                              batch_size)


# ---- preference pairs -----------------------------------------------------------------------


def _check_part(value: Any, key: str, where: str) -> Conversation:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise ValueError(f"{where}: {key!r} must be a string or a list of chat messages "
                     f"({{'role': ..., 'content': ...}}), got {type(value).__name__}")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Preference pairs of a JSONL file, one ``{"prompt", "chosen", "rejected"}`` per line.

    Each field is a string or a list of chat messages; ``prompt`` may be left out when
    ``chosen`` and ``rejected`` are whole conversations. Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad row or an empty file; the message starts with ``path:line``.
    """
    pairs = []
    for num, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{num}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing {missing}; a row is "
                             '{"prompt": ..., "chosen": ..., "rejected": ...}')
        prompt = _check_part(row.get("prompt", []), "prompt", where)
        pairs.append(PreferencePair(prompt, _check_part(row["chosen"], "chosen", where),
                                    _check_part(row["rejected"], "rejected", where)))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file")
    return pairs


def write_pairs(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write ``pairs`` as JSONL (the format ``read_pairs`` reads); returns ``path``."""
    rows = [json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            for p in pairs]
    Path(path).write_text("\n".join(rows) + "\n")
    return Path(path)


def last_turn(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str] | None:
    """``(messages before the last assistant message, its content)``; None without one."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[:i], messages[i].get("content") or ""
    return None


def pairs_from_episodes(episodes: Iterable[Episode], *, agent: str | None = None,
                        score: Callable[[Episode], float] | None = None,
                        min_margin: float = 0.0, max_pairs_per_group: int | None = None
                        ) -> list[PreferencePair]:
    """Preference pairs from scored episodes, per task seed: every better/worse pair of
    responses of ``agent`` to the same task.

    Args:
        episodes: finished episodes; those of one ``seed`` answer the same task.
        agent: whose last response is compared (default: the only agent of the episodes).
        score: ``episode -> float`` (a judge's label, ground truth...); default the agent's
            return.
        min_margin: a pair needs ``score(chosen) - score(rejected) > min_margin``.
        max_pairs_per_group: keep at most this many pairs per seed (largest margins first).

    Raises:
        ValueError: ``agent`` not given and the episodes have several agents.
    """
    groups: dict[Any, list[tuple[float, list[dict[str, Any]], str]]] = {}
    for ep in episodes:
        if agent is None and len(ep.agents) != 1:
            raise ValueError(f"episodes have agents {ep.agents}; name the one to compare "
                             "with agent=")
        who = agent or ep.agents[0]
        turn = last_turn(ep.messages.get(who, []))
        if ep.status == "failed" or turn is None:
            continue
        value = score(ep) if score is not None else ep.returns.get(who, 0.0)
        groups.setdefault(ep.seed, []).append((float(value), *turn))
    pairs = []
    for members in groups.values():
        found = {(a[2], b[2]): (a[0] - b[0], a[1]) for a in members for b in members
                 if a[0] - b[0] > min_margin and a[2] != b[2]}
        ranked = sorted(found.items(), key=lambda kv: -kv[1][0])[:max_pairs_per_group]
        pairs.extend(PreferencePair(prompt, c, r) for (c, r), (_, prompt) in ranked)
    return pairs


# ---- training -------------------------------------------------------------------------------


def evaluate_pairs(rm: RewardModel, pairs: Sequence[PreferencePair], batch_size: int = 32
                   ) -> dict[str, float]:
    """``{"accuracy", "loss", "margin"}`` on ``pairs``: the fraction with ``r(chosen) >
    r(rejected)`` (ties count a half), the mean BT loss and the mean reward difference."""
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs], batch_size)
    rejected = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs], batch_size)
    rc, rr = torch.tensor(chosen), torch.tensor(rejected)
    wins = (rc > rr).float() + 0.5 * (rc == rr).float()
    return {"accuracy": float(wins.mean()), "loss": float(bradley_terry_loss(rc, rr)),
            "margin": float((rc - rr).mean())}


@dataclass
class _Encoded:
    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)


def train_reward_model(
    pairs: Sequence[PreferencePair], *, model: str | Path | RewardModel = "tiny:xs",
    steps: int = 200, lr: float = 1e-4, batch_size: int = 16,
    eval_pairs: Sequence[PreferencePair] | None = None, eval_every: int = 50, seed: int = 0,
    weight_decay: float = 0.0, max_grad_norm: float = 1.0, logger: Logger | None = None,
) -> RewardModel:
    """Fit a reward model to ``pairs`` with the Bradley-Terry loss (AdamW, shuffled epochs).

    Before the first step, every ``eval_every`` steps and after the last one, the held-out
    ``eval_pairs`` are scored: ``rm/eval_accuracy``, ``rm/eval_loss``, ``rm/eval_margin`` go
    to ``logger`` with ``rm/train_loss`` / ``rm/train_accuracy`` (means since the last eval);
    the same rows are kept in the returned model's ``history``.

    Args:
        model: a ``RewardModel``, or a spec for ``RewardModel.from_pretrained``.

    Raises:
        ValueError: no pairs, or ``steps`` / ``batch_size`` < 1.
    """
    if not pairs:
        raise ValueError("train_reward_model() got no preference pairs")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1 (got {steps}, {batch_size})")
    rm = model if isinstance(model, RewardModel) else RewardModel.from_pretrained(model, seed=seed)
    logger = logger or NullLogger()
    data = _Encoded([rm.encode(p.prompt, p.chosen) for p in pairs],
                    [rm.encode(p.prompt, p.rejected) for p in pairs])
    optimizer = torch.optim.AdamW(rm.model.parameters(), lr=lr, weight_decay=weight_decay)
    rng, order = random.Random(seed), []
    losses: list[float] = []
    wins: list[float] = []
    rm.history = []

    def log(step: int) -> None:
        row: dict[str, float] = {}
        if losses:
            row.update({"rm/train_loss": sum(losses) / len(losses),
                        "rm/train_accuracy": sum(wins) / len(wins)})
        if eval_pairs:
            row.update({f"rm/eval_{k}": v for k, v in evaluate_pairs(rm, eval_pairs).items()})
        losses.clear()
        wins.clear()
        logger.log(step, row)
        rm.history.append({"step": step, **row})

    log(0)
    rm.model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order.extend(rng.sample(range(len(pairs)), len(pairs)))
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask = rm.pad([data.chosen[i] for i in idx] + [data.rejected[i] for i in idx])
        rewards = rm.forward(ids, mask)  # [2 * pairs]: chosen rows, then rejected rows
        rc, rr = rewards[: len(idx)], rewards[len(idx):]
        loss = bradley_terry_loss(rc, rr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        wins.append(float((rc > rr).float().mean().detach()))
        if step == steps or (eval_every and step % eval_every == 0):
            log(step)
    rm.model.eval()
    return rm


# ---- as a reward function -------------------------------------------------------------------


class RewardModelReward:
    """A ``reward_fns`` entry: the reward model's score of each agent's last response.

    The prompt is the agent's transcript before its last assistant message (what it saw when
    it answered; later env feedback is left out), the response that message. Calls of
    concurrently finishing episodes are scored together in one no-grad batch (on a worker
    thread). Agents without a response get no reward and are counted in ``num_unscored``.

    Args:
        rm: the reward model.
        agents: which agents to reward (default: every agent of the episode).
        normalize: ``"none"``; ``"running"``: ``(r - mean) / std`` over every score so far;
            ``"sigmoid"``: ``sigmoid(r)`` in (0, 1).
        clip: clip the (normalised) reward to ``[-clip, clip]``.
        batch_size: rows per forward pass.

    Example:
        >>> reward = RewardModelReward(RewardModel.from_pretrained("tiny:xs"), normalize="sigmoid")
        >>> trainer = aa.Trainer(..., reward_fns=[reward])  # doctest: +SKIP
    """

    def __init__(self, rm: RewardModel, *, agents: Sequence[str] | None = None,
                 normalize: Literal["none", "running", "sigmoid"] = "none",
                 clip: float | None = None, batch_size: int = 32) -> None:
        if normalize not in ("none", "running", "sigmoid"):
            raise ValueError(f"normalize={normalize!r}; choose 'none', 'running' or 'sigmoid'")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 (or None), got {clip}")
        self.rm, self.agents, self.normalize, self.clip = rm, agents, normalize, clip
        self.batch_size = batch_size
        self.num_scored = self.num_unscored = 0
        self._step_raw: list[float] = []  # raw scores since the last take_metrics()
        self._step_unscored = 0
        self._count, self._mean, self._m2 = 0, 0.0, 0.0  # Welford running moments
        self._queue: list[tuple[list[int], asyncio.Future[float]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _post(self, raw: float) -> float:
        if self.normalize == "running":
            std = math.sqrt(self._m2 / self._count) if self._count > 1 else 1.0
            raw = (raw - self._mean) / max(std, 1e-6)
        elif self.normalize == "sigmoid":
            raw = 1.0 / (1.0 + math.exp(-raw))
        return raw if self.clip is None else max(-self.clip, min(self.clip, raw))

    policy: str | None = None
    """No served policy: the model runs in this process (``rewards.hooks.ModelReward``)."""

    def bind(self, client: Any) -> None:
        """Nothing to bind: no gateway client is needed."""

    def take_metrics(self) -> dict[str, float]:
        """``reward_model/{scored,unscored,raw_mean}`` since the last call (logged per step)."""
        out = {"reward_model/scored": float(len(self._step_raw)),
               "reward_model/unscored": float(self._step_unscored)}
        if self._step_raw:
            out["reward_model/raw_mean"] = sum(self._step_raw) / len(self._step_raw)
        self._step_raw, self._step_unscored = [], 0
        return out

    def _observe(self, raws: Iterable[float]) -> None:
        for r in raws:
            self._step_raw.append(r)
            self._count += 1
            delta = r - self._mean
            self._mean += delta / self._count
            self._m2 += delta * (r - self._mean)

    def _requests(self, episode: Episode) -> list[tuple[str, list[int]]]:
        out = []
        for agent in self.agents or episode.agents:
            turn = last_turn(episode.messages.get(agent, []))
            if turn is None:
                self.num_unscored += 1
                self._step_unscored += 1
                continue
            out.append((agent, self.rm.encode(*turn)))
        return out

    def score_episodes(self, episodes: Sequence[Episode]) -> list[dict[str, float]]:
        """Rewards of many episodes at once (synchronous, no grad)."""
        requests = [self._requests(ep) for ep in episodes]
        raws = self.rm.score_ids([ids for req in requests for _, ids in req], self.batch_size)
        self._observe(raws)
        self.num_scored += len(raws)
        it = iter(raws)
        return [{agent: self._post(next(it)) for agent, _ in req} for req in requests]

    async def __call__(self, episode: Episode) -> dict[str, float]:
        requests = self._requests(episode)
        loop = asyncio.get_running_loop()
        futures = []
        for _, ids in requests:
            futures.append(loop.create_future())
            self._queue.append((ids, futures[-1]))
        if futures and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush())
        raws = await asyncio.gather(*futures)
        return {agent: self._post(raw) for (agent, _), raw in zip(requests, raws, strict=True)}

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # episodes finishing in this loop turn join the batch
        while self._queue:
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size:]
            try:
                raws = await asyncio.to_thread(self.rm.score_ids, [ids for ids, _ in batch],
                                               self.batch_size)
            except Exception as exc:  # every waiting episode fails with the cause
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self._observe(raws)
            self.num_scored += len(raws)
            for (_, fut), raw in zip(batch, raws, strict=True):
                if not fut.done():
                    fut.set_result(raw)


__all__ = [
    "PreferencePair", "RewardModel", "RewardModelReward", "bradley_terry_loss",
    "conversation", "evaluate_pairs", "last_turn", "pairs_from_episodes", "read_pairs",
    "train_reward_model", "write_pairs",
]
