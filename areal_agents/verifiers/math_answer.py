"""``math``: the response's final math answer equals the reference, through ``math-verify``."""

from __future__ import annotations

import threading
from typing import Any

from areal_agents.extras import require

from .base import Verdict, shorten


def _math_verify() -> Any:
    return require("math_verify", "math", "the 'math' verifier")


class MathVerifier:
    r"""Score 1 when the response's answer is mathematically equal to the reference.

    ``math-verify`` extracts the answer (the last ``\boxed{}`` first, else LaTeX or a plain
    expression) and compares symbolically and numerically, so ``\boxed{\frac{1}{2}}``,
    ``0.5`` and ``1/2`` are equal, ``1,000`` equals ``1000`` and ``5\text{ cm}`` equals
    ``5``.

    Args:
        timeout_s: seconds allowed per parse and per comparison. ``math-verify`` enforces it
            with ``SIGALRM``, which only works in the main thread: elsewhere (e.g. the
            Gymnasium adapter's helper thread) it runs without a timeout.
        float_rounding: decimals floats are rounded to before comparing.
        strict: variables must match by name (``math-verify``'s ``strict``).

    Raises:
        ModuleNotFoundError: ``math-verify`` is not installed (the message names the extra).

    Example:
        >>> MathVerifier().verify(r"so the answer is $\boxed{\frac{1}{2}}$", "0.5").score
        1.0
    """

    def __init__(self, timeout_s: int = 5, float_rounding: int = 6, strict: bool = True) -> None:
        _math_verify()
        if timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1 (whole seconds), got {timeout_s}")
        self.timeout_s, self.float_rounding, self.strict = int(timeout_s), float_rounding, strict

    def _timeout(self) -> int | None:
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def _parse_reference(self, answer: Any) -> list[Any]:
        mv, text = _math_verify(), str(answer).strip()
        gold = mv.parse(text, parsing_timeout=self._timeout())
        if not gold and not text.startswith("$"):
            gold = mv.parse(f"${text}$", parsing_timeout=self._timeout())
        if not gold:
            raise ValueError(
                f"the reference answer {answer!r} is not a math expression math-verify can "
                "parse; fix the dataset's answer field or use another verifier"
            )
        return gold

    def verify(self, response: str, answer: Any) -> Verdict:
        """See the class docstring. Raises ``ValueError`` only for an unusable ``answer``."""
        gold = self._parse_reference(answer)
        text = response if isinstance(response, str) else ""
        if not text.strip():
            return Verdict(0.0, "empty response")
        mv = _math_verify()
        try:
            pred = mv.parse(text, parsing_timeout=self._timeout())
            if not pred:
                return Verdict(0.0, f"no math answer found in the response {shorten(text)!r}")
            equal = mv.verify(
                gold, pred, float_rounding=self.float_rounding, strict=self.strict,
                timeout_seconds=self._timeout(),
            )  # fmt: skip
        except Exception as exc:  # math-verify's own errors and timeouts: score 0, say why
            return Verdict(0.0, f"could not check the answer ({type(exc).__name__}: {exc})")
        got = shorten(str(pred[-1] if len(pred) > 1 else pred[0]))
        if equal:
            return Verdict(1.0, f"expected {shorten(str(answer))}, got {got}: equal")
        return Verdict(0.0, f"got {got}: not equal to the expected answer")
