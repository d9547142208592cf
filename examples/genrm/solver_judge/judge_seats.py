"""SolverJudge's judge seats: with ``SolverJudge(judge_samples=K)`` the judge is asked K times on
the same transcript (seats ``judge``, ``judge_1``, ..., all mapped to one policy).

The judge's K verdicts on one answer form one GRPO group through the library's
``group_by="episode"`` (``areal_agents.algorithms.turn_groups``; ``run.py`` sets it in the judge
policy's ``algorithm_params``): a verdict's advantage is its reward minus the mean reward of the
verdicts on the *same* answer, not of the seat's verdicts on the task's other answers.
"""

from __future__ import annotations

from typing import Any

from areal_agents.episode import Episode


def is_judge_seat(agent_id: str) -> bool:
    """Whether ``agent_id`` is one of SolverJudge's judge seats (``judge``, ``judge_<k>``).

    Example:
        >>> [is_judge_seat(a) for a in ("judge", "judge_2", "solver")]
        [True, True, False]
    """
    return agent_id == "judge" or agent_id.startswith("judge_")


def judge_infos(episode: Episode) -> list[tuple[str, dict[str, Any]]]:
    """``(seat, final info)`` of each judge seat of a finished SolverJudge episode that
    carries a verdict (``solver_correct`` set), in seat order."""
    return [(a, info) for a, info in episode.infos.items()
            if is_judge_seat(a) and "solver_correct" in info]
