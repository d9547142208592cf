"""The verifier table: one name per verifier, resolved lazily (``get``, ``register``)."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from areal_agents.errors import ConfigError

from .base import Verifier

VerifierFactory = Callable[..., Verifier]

# name -> "module:attr" (imported on first use) or a factory. "code" lives with the sandbox
# (areal_agents/verifiers/code.py); that module may also call register("code", ...) itself.
VERIFIERS: dict[str, str | VerifierFactory] = {
    "math": "areal_agents.verifiers.math_answer:MathVerifier",
    "exact": "areal_agents.verifiers.exact:ExactVerifier",
    "regex": "areal_agents.verifiers.regex:RegexVerifier",
    "numeric": "areal_agents.verifiers.numeric:NumericVerifier",
    "json_schema": "areal_agents.verifiers.json_schema:JSONSchemaVerifier",
    "code": "areal_agents.verifiers.code:CodeVerifier",
}


def register(name: str, factory: str | VerifierFactory, *, replace: bool = False) -> None:
    """Add a verifier to the table.

    Args:
        name: the name envs and YAML configs use, e.g. ``"my_judge"``.
        factory: a class/callable building the verifier from keyword options, or
            ``"module:attr"`` imported on first use.
        replace: allow replacing an existing entry.

    Raises:
        ConfigError: ``name`` is taken and ``replace`` is False.
    """
    if name in VERIFIERS and not replace and VERIFIERS[name] != factory:
        raise ConfigError(
            f"a verifier named {name!r} is already registered ({VERIFIERS[name]!r}); "
            "choose another name or pass replace=True"
        )
    VERIFIERS[name] = factory


def _resolve(name: str) -> VerifierFactory:
    entry = VERIFIERS[name]
    if not isinstance(entry, str):
        return entry
    module_name, _, attr = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but one of its own imports is missing: show that
        raise ConfigError(
            f"verifier {name!r} needs the module {module_name}, which is not installed; "
            "update areal_agents or choose another verifier"
        ) from None
    if VERIFIERS[name] is not entry:  # the module registered its own factory on import
        return _resolve(name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(
            f"verifier {name!r}: {module_name} defines no {attr!r}; it must define it or call "
            f"areal_agents.verifiers.register({name!r}, factory) on import"
        )
    VERIFIERS[name] = factory
    return factory


def get(name: str, **options: Any) -> Verifier:
    """Build the verifier registered as ``name`` with keyword ``options``.

    Example:
        >>> get("numeric", rel_tol=0.01).verify("about 99.5", 100).score
        1.0

    Raises:
        ConfigError: unknown name (with close matches), or an option the verifier does not
            take.
        ModuleNotFoundError: the verifier's optional dependency is not installed (the
            message names the ``areal-agents`` extra).
    """
    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, list(VERIFIERS), n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"no verifier named {name!r}{hint} (known: {', '.join(sorted(VERIFIERS))})"
        )
    factory = _resolve(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ConfigError(
                f"verifier {name!r} takes no option {', '.join(map(repr, unknown))} "
                f"(its options: {', '.join(params) or 'none'})"
            )
    return factory(**options)


def resolve(verifier: str | Verifier, options: dict[str, Any] | None = None) -> Verifier:
    """A verifier from a name (built with ``options``) or an object with ``verify``.

    Raises:
        ConfigError: see ``get``; or options given with a verifier object; or an object
            without a ``verify`` method.
    """
    if isinstance(verifier, str):
        return get(verifier, **(options or {}))
    if options:
        raise ConfigError(
            f"verifier_kwargs {sorted(options)} were given with a verifier object "
            f"({type(verifier).__name__}); pass options to its constructor instead"
        )
    if not callable(getattr(verifier, "verify", None)):
        raise ConfigError(
            f"verifier must be a registered name ({', '.join(sorted(VERIFIERS))}) or an "
            f"object with verify(response, answer) -> Verdict, got {type(verifier).__name__}"
        )
    return verifier
