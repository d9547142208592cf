"""The tokenization contract: session turns -> prompt ids and training ``Sample``s.

Generated text is never re-tokenized. When a chat request extends an earlier request's
messages plus that request's reply, its prompt ids are the earlier prompt ids + the earlier
completion ids + the ids of only the new template text (rendered suffix). Any template text the
completion did not generate itself (e.g. the ``"\\n"`` ChatML puts after ``<|im_end|>``, or
the whole ``<|im_end|>\\n`` after a length-truncated reply) is part of that suffix, with loss
mask 0. Turns whose prompt ids extend an earlier sample merge into it; others start a new
sample, and every such split is reported with the first differing position. A turn sampled
with other parameters (temperature, top-k, top-p) than the sample it extends also starts a new
sample: a sample's log-probs have one definition (``Sample.sampling``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..samples import Sample
from .chat import encode, render, same_message
from .sessions import Turn


def conversation_key(messages: list[dict[str, Any]]) -> str:
    """A canonical key of a message list: assistant tool calls compare by name and decoded
    arguments (their ids and JSON spacing do not matter), as in ``same_message``."""
    canon = []
    for m in messages:
        if m.get("role") == "assistant":
            calls = [(c.get("function", {}).get("name"), _decoded(c.get("function", {}).get(
                "arguments"))) for c in m.get("tool_calls") or []]
            canon.append({"role": "assistant", "content": m.get("content") or None,
                          "calls": calls})
        else:
            canon.append(m)
    return json.dumps(canon, sort_keys=True, default=str)


def _decoded(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def index_turn(index: dict[str, list[int]], turns: list[Turn], turn_index: int) -> None:
    """Register a chat turn under the key of its messages + reply (see ``prompt_ids_for``)."""
    turn = turns[turn_index]
    if turn.messages is not None and turn.reply is not None:
        index.setdefault(conversation_key([*turn.messages, turn.reply]), []).append(turn_index)


def _candidates(turns: list[Turn], messages: list[dict[str, Any]],
                index: dict[str, list[int]] | None) -> list[int]:
    if index is None:  # no index: every earlier turn, latest first
        return list(range(len(turns) - 1, -1, -1))
    out: list[int] = []
    for j in range(len(messages) - 1, -1, -1):
        if messages[j].get("role") == "assistant":
            out.extend(reversed(index.get(conversation_key(messages[: j + 1]), [])))
    return out


def prompt_ids_for(tokenizer: Any, turns: list[Turn], messages: list[dict[str, Any]],
                   tools: list[dict] | None, eos_id: int,
                   index: dict[str, list[int]] | None = None) -> tuple[list[int], int | None]:
    """Prompt ids for a chat request of a session.

    Looks for the latest turn whose messages + reply are a prefix of ``messages`` (via
    ``index``, built with ``index_turn``, or by scanning every turn when it is None), with the
    same tools, and whose rendering is a text prefix of the new rendering; builds the prompt
    from that turn's ids plus the ids of the new suffix text.

    Returns:
        ``(prompt_ids, prefix_turn)``; ``prefix_turn`` is None when the prompt was tokenized
        from scratch (first turn, edited history, changed system prompt or tools).

    Raises:
        ValueError: the chat template cannot render the messages.
    """
    eos_text = tokenizer.decode([eos_id], skip_special_tokens=False)
    full = render(tokenizer, messages, tools, add_generation_prompt=True)
    for i in _candidates(turns, messages, index):
        turn = turns[i]
        if turn.messages is None or turn.reply is None or turn.tools != tools:
            continue
        k = len(turn.messages)
        if len(messages) <= k or messages[:k] != turn.messages:
            continue
        if not same_message(messages[k], turn.reply):
            continue
        prev = render(tokenizer, [*turn.messages, turn.reply], tools,
                      add_generation_prompt=False)
        if not full.startswith(prev):
            continue
        cut = prev.rfind(eos_text)
        if cut < 0:
            continue
        generated_eos = bool(turn.completion_ids) and turn.completion_ids[-1] == eos_id
        tail = prev[cut + len(eos_text):] if generated_eos else prev[cut:]
        suffix = tail + full[len(prev):]
        return turn.prompt_ids + turn.completion_ids + encode(tokenizer, suffix), i
    return encode(tokenizer, full), None


@dataclass
class Split:
    """A turn that could not be merged into any earlier sample.

    Attributes:
        turn: the turn's index.
        against: the index of the sample it was compared with (the latest one).
        position: the first token position where the turn's prompt differs from that sample.
        reason: a short human-readable cause.
    """

    turn: int
    against: int
    position: int
    reason: str


@dataclass
class TokenizationReport:
    """What ``turns_to_samples`` did: ``num_splits`` > 0 means some turns did not merge."""

    num_turns: int = 0
    num_samples: int = 0
    splits: list[Split] = field(default_factory=list)

    @property
    def num_splits(self) -> int:
        return len(self.splits)


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def turns_to_samples(turns: list[Turn], *, reward: float = 0.0, agent: str = "",
                     policy: str = "", group: str = "", meta: dict[str, Any] | None = None,
                     ) -> tuple[list[Sample], TokenizationReport]:
    """Merge turns into samples (loss mask on completion tokens only).

    A turn extends the latest sample whose ``token_ids`` are a prefix of the turn's prompt
    ids: the new prompt tokens are appended with mask 0, log-prob 0.0, version -1, then the
    completion with mask 1 and its log-probs and versions. A turn extending no sample starts a
    new one; if earlier samples exist, the split is recorded against the latest sample. A turn
    whose sampling parameters (``Turn.sampling``) differ from those of the sample it extends
    is split the same way (recorded against that sample, at its length), so every sample's
    log-probs are taken under one distribution, its ``sampling``.

    Returns:
        ``(samples, report)``; each sample's ``meta["turns"]`` lists its turn indices.
    """
    samples: list[Sample] = []
    report = TokenizationReport(num_turns=len(turns))
    for t, turn in enumerate(turns):
        target, split = None, None
        for i in range(len(samples) - 1, -1, -1):
            s = samples[i]
            n = len(s.token_ids)
            if len(turn.prompt_ids) >= n and turn.prompt_ids[:n] == s.token_ids:
                if s.sampling == turn.sampling:
                    target = s
                else:
                    split = Split(t, i, n, f"sampling params differ from the sequence it "
                                  f"extends ({turn.sampling} vs {s.sampling})")
                break
        if target is None:
            if split is None and samples:
                last = samples[-1]
                pos = _first_difference(last.token_ids, turn.prompt_ids)
                reason = ("prompt is shorter than the previous sequence"
                          if pos == len(turn.prompt_ids) else "prompt differs from the "
                          "previous sequence (history edited, new system prompt, or a branch)")
                split = Split(t, len(samples) - 1, pos, reason)
            if split is not None:
                report.splits.append(split)
            target = Sample([], [], [], [], reward=reward, agent=agent, policy=policy,
                            group=group, meta={**(meta or {}), "turns": []},
                            sampling=turn.sampling)
            samples.append(target)
        new = turn.prompt_ids[len(target.token_ids):]
        target.token_ids.extend(new + turn.completion_ids)
        target.loss_mask.extend([0] * len(new) + [1] * len(turn.completion_ids))
        target.logprobs.extend([0.0] * len(new) + list(turn.logprobs))
        target.versions.extend([-1] * len(new) + list(turn.versions))
        target.meta["turns"].append(t)
    report.num_samples = len(samples)
    for s in samples:
        s.__post_init__()  # re-check alignment after in-place extension
    return samples, report
