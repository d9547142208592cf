"""Per-class normalisation of the judge's reward inside each GRPO group, and its diagnostics.

SolverJudge pays the judge 1 when its verdict agrees with the exact verifier. When most solver
answers are wrong, a judge that cannot tell the classes apart gains by drifting to
"incorrect": under a group baseline the push on the verdict is proportional to
``#wrong - #right`` answers. ``PerClassJudgeReward`` (a group reward function) replaces the
judge's reward ``r`` of an answer of class ``c`` (right / wrong) by

    ``r' = 0.5 / p_c * (r - b_c)``

where ``p_c`` is the running share of class ``c`` and ``b_c`` the judge's running accuracy on
class ``c``: a per-class baseline (the class is part of the judge's state, so the gradient
stays unbiased) with per-class weights, so both classes pull equally in expectation and the
judge's expected reward is its balanced accuracy, up to a constant. The running figures are
exponential moving averages over groups, updated after each group is scored.

With ``normalise=False`` it adds nothing and only logs the same per-step diagnostics
(``judge_groups/*``): the base rate of right answers, the judge's verdict distribution and
accuracy per class, the share of groups holding both classes, and the judge's group-centred
reward per class (its GRPO advantage before any std normalisation).

With several judge verdicts per answer (``SolverJudge(judge_samples=K)``) every verdict (judge
seat) is a row of its own; ``per_answer=True`` centres the diagnostic advantages over the K
verdicts on each answer (the judge's GRPO groups with ``group_by="episode"``), where
the per-class baseline ``b_c`` cancels (one answer is one class) and only the weight
``0.5 / p_c`` remains. ``judge_groups/split_answers`` is then the share of answers whose K
verdicts disagree: only those give the judge a non-zero advantage.
"""

from __future__ import annotations

from typing import Any

from judge_seats import judge_infos

from areal_agents.episode import Episode


class PerClassJudgeReward:
    """A group reward function (``Trainer(group_reward_fns=[...])``) for SolverJudge's judge.

    It reads ``infos[seat]["solver_correct"]`` and ``["success"]`` (agreement) of each judge
    seat of each episode and assumes the judge's reward so far is exactly the env's agreement
    reward (no other reward function pays the judge). ``take_metrics()`` is logged each step.

    Args:
        normalise: replace the judge's reward by the per-class normalised one (else add 0).
        decay: EMA factor of the running class share and per-class accuracies (per group).
        per_answer: centre the diagnostic advantages per answer (episode), not per group.

    Example:
        >>> fn = PerClassJudgeReward()
        >>> fn.scaled(True, 1.0), fn.scaled(False, 0.0)  # start: p = 0.5, b = 0.5
        (0.5, -0.5)
    """

    policy: str | None = None  # calls no served model

    def __init__(self, normalise: bool = True, decay: float = 0.9,
                 per_answer: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.normalise, self.decay, self.per_answer = normalise, decay, per_answer
        self.p_right = 0.5
        self.accuracy = {True: 0.5, False: 0.5}
        self._rows: list[tuple[bool, bool, bool, float]] = []  # class, said correct, agreed, adv
        self._groups = [0, 0]  # groups seen, groups holding both classes
        self._answers = [0, 0]  # answers with several verdicts, those whose verdicts split

    def bind(self, client: Any) -> None:
        """No model to call."""

    def scaled(self, right: bool, agreed: float) -> float:
        """``0.5 / p_c * (agreed - b_c)`` for an answer of class ``right``, at the current
        running share and accuracies."""
        p = self.p_right if right else 1.0 - self.p_right
        return 0.5 / max(p, 0.05) * (agreed - self.accuracy[right])

    def __call__(self, episodes: list[Episode]) -> list[dict[str, float]]:
        # one row per verdict: (episode index, seat, class, said correct, agreed)
        rows = [(e, seat, bool(info["solver_correct"]), info.get("verdict") == "correct",
                 float(info["success"]))
                for e, episode in enumerate(episodes) for seat, info in judge_infos(episode)]
        if not rows:
            return [{} for _ in episodes]
        new = [self.scaled(r[2], r[4]) if self.normalise else r[4] for r in rows]
        centre = {}
        for e in {r[0] for r in rows}:
            own = [n for r, n in zip(rows, new, strict=True) if r[0] == e or not self.per_answer]
            centre[e] = sum(own) / len(own)
            verdicts = [r[3] for r in rows if r[0] == e]
            if len(verdicts) > 1:
                self._answers[0] += 1
                self._answers[1] += len(set(verdicts)) == 2
        for r, n in zip(rows, new, strict=True):
            self._rows.append((r[2], r[3], bool(r[4]), n - centre[r[0]]))
        self._groups[0] += 1
        self._groups[1] += len({r[2] for r in rows}) == 2
        self._update([r[2:] for r in rows])
        out: list[dict[str, float]] = [{} for _ in episodes]
        for r, n in zip(rows, new, strict=True):
            out[r[0]][r[1]] = n - r[4]
        return out

    def _update(self, scored: list[tuple[bool, bool, float]]) -> None:
        d = self.decay
        self.p_right = d * self.p_right + (1 - d) * sum(r[0] for r in scored) / len(scored)
        for c in (True, False):
            hits = [r[2] for r in scored if r[0] == c]
            if hits:
                self.accuracy[c] = d * self.accuracy[c] + (1 - d) * sum(hits) / len(hits)

    def take_metrics(self) -> dict[str, float]:
        """This step's ``judge_groups/*`` figures (rows since the last call; they restart)."""
        rows, self._rows = self._rows, []
        groups, self._groups = self._groups, [0, 0]
        answers, self._answers = self._answers, [0, 0]
        out = {"judge_groups/running_p_right": self.p_right,
               "judge_groups/running_accuracy_right": self.accuracy[True],
               "judge_groups/running_accuracy_wrong": self.accuracy[False]}
        if not rows:
            return out
        out["judge_groups/p_right"] = sum(r[0] for r in rows) / len(rows)
        out["judge_groups/said_correct"] = sum(r[1] for r in rows) / len(rows)
        out["judge_groups/mixed_groups"] = groups[1] / max(groups[0], 1)
        if answers[0]:
            out["judge_groups/split_answers"] = answers[1] / answers[0]
        for c, name in ((True, "right"), (False, "wrong")):
            part = [r for r in rows if r[0] == c]
            if part:
                out[f"judge_groups/accuracy_{name}"] = sum(r[2] for r in part) / len(part)
                out[f"judge_groups/advantage_{name}"] = sum(r[3] for r in part) / len(part)
        if "judge_groups/accuracy_right" in out and "judge_groups/accuracy_wrong" in out:
            out["judge_groups/balanced_accuracy"] = 0.5 * (
                out["judge_groups/accuracy_right"] + out["judge_groups/accuracy_wrong"])
        return out
