"""A Bradley-Terry reward model: a one-label sequence scorer trained on preference pairs.

The model is a transformers ``AutoModelForSequenceClassification`` with ``num_labels=1``
(``Qwen3ForSequenceClassification`` for the tiny models). A (prompt, response) pair is
rendered with the tokenizer's chat template and scored by the head at its *last attended
token*; position ids follow the attention mask, so a sequence scores the same alone, right-
padded or left-padded. Training minimises ``-log sigmoid(r(chosen) - r(rejected))``.

Pairs come from a JSONL file (``read_pairs``: rows ``{"prompt", "chosen", "rejected"}``,
strings or chat-message lists) or from a run's own scored episodes (``pairs_from_episodes``);
both live in ``preference_pairs``. ``RewardModelReward`` (in ``reward_model_reward``) turns a
trained model into a ``reward_fns`` entry. Every name is also importable from this module.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from areal_agents.metrics import Logger, NullLogger

from .preference_pairs import (
    Conversation,
    PreferencePair,
    conversation,
    last_turn,
    pairs_from_episodes,
    read_pairs,
    write_pairs,
)


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


__all__ = [
    "PreferencePair", "RewardModel", "RewardModelReward", "bradley_terry_loss",
    "conversation", "evaluate_pairs", "last_turn", "pairs_from_episodes", "read_pairs",
    "train_reward_model", "write_pairs",
]

from .reward_model_reward import RewardModelReward  # noqa: E402  (re-exported; imports us lazily)
