"""``regex``: a pattern's group in the response equals the answer after normalisation."""

from __future__ import annotations

import re
from typing import Any

from .base import Verdict, shorten
from .exact import Whitespace, compare, normalize


class RegexVerifier:
    r"""Score 1 when a group of the last match of ``pattern`` equals the answer.

    The group compared is ``group`` when given, else the named group ``answer`` when the
    pattern has one, else group 1, else the whole match. Both sides are normalised with
    ``exact.normalize``; the answer may be a list of accepted strings.

    Args:
        pattern: a Python regular expression searched in the response (``re.DOTALL``).
        group: the group number or name to compare.
        case_sensitive, whitespace, trailing: as for ``ExactVerifier`` (the pattern itself
            matches case-insensitively unless ``case_sensitive``).

    Raises:
        ValueError: the pattern does not compile, or has no such group.

    Example:
        >>> v = RegexVerifier(r"Answer: (\w+)")
        >>> v.verify("Answer: B", "b").score
        1.0
        >>> print(v.verify("I pick B", "b").reason)
        pattern 'Answer: (\\w+)' not found in the response
    """

    def __init__(
        self,
        pattern: str,
        group: int | str | None = None,
        case_sensitive: bool = False,
        whitespace: Whitespace = "collapse",
        trailing: str = ".",
    ) -> None:
        flags = re.DOTALL | (0 if case_sensitive else re.IGNORECASE)
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(
                f"regex verifier: pattern {pattern!r} does not compile: {exc}"
            ) from None
        if group is None:
            group = "answer" if "answer" in self.regex.groupindex else min(self.regex.groups, 1)
        if isinstance(group, str) and group not in self.regex.groupindex:
            raise ValueError(f"regex verifier: pattern {pattern!r} has no group named {group!r}")
        if isinstance(group, int) and not 0 <= group <= self.regex.groups:
            raise ValueError(
                f"regex verifier: pattern {pattern!r} has {self.regex.groups} group(s), "
                f"no group {group}"
            )
        self.pattern, self.group = pattern, group
        self.case_sensitive, self.whitespace, self.trailing = case_sensitive, whitespace, trailing

    def verify(self, response: str, answer: Any) -> Verdict:
        """See the class docstring."""
        text = response if isinstance(response, str) else ""
        if not text.strip():
            return Verdict(0.0, "empty response")
        matches = list(self.regex.finditer(text))
        if not matches:
            return Verdict(0.0, f"pattern {shorten(self.pattern)!r} not found in the response")
        got = matches[-1].group(self.group) or ""
        return compare(
            lambda s: normalize(s, self.case_sensitive, self.whitespace, self.trailing),
            got.strip(),
            answer,
        )
