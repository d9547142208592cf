"""Answer verifiers: score a response against a reference answer, with a reason.

A ``Verifier`` has ``verify(response, answer) -> Verdict(score, reason)``. The table
``VERIFIERS`` names the built-in ones, so envs and YAML configs pick one by string::

    name         accepts                                          options
    math         \\boxed{}, LaTeX, fractions, units (math-verify)  timeout_s, float_rounding, strict
    exact        the whole response, or the part after a marker   case_sensitive, whitespace,
                                                                  trailing, answer_prefix
    regex        a pattern's group                                pattern, group, case_sensitive, ...
    numeric      1,234 / 3/4 / -2.5e3, within a tolerance         abs_tol, rel_tol, pick
    json_schema  a JSON object valid under a schema               schema
    code         code run against unit tests in the sandbox       (see verifiers.code)

Example:
    >>> from areal_agents import verifiers
    >>> verifiers.get("numeric").verify("The answer is 0.75", "3/4")
    Verdict(score=1.0, reason='expected 0.75, got 0.75: equal')
"""

from .base import Verdict, Verifier, averify
from .registry import VERIFIERS, get, register, resolve

__all__ = ["VERIFIERS", "Verdict", "Verifier", "averify", "get", "register", "resolve"]
