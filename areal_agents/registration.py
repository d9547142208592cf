"""The environment registry: ``register``, ``make``, ``spec``, ``registry`` and entry points.

Third-party packages add envs through the ``areal_agents.envs`` entry-point group: each entry
point names either a module (imported for its ``register`` calls) or a callable (called once
with no arguments; it calls ``register``). Discovery runs lazily, once, on the first lookup,
right after the built-in envs (``areal_agents.envs``) are imported.

Env conventions announced here (followed by the built-in envs):

* ``sample_action(self, agent: str | None = None) -> str`` (optional): a valid random action
  for ``agent`` (``None`` for single-agent envs), drawn from an RNG independent of
  ``self.np_random`` so sampling never changes the episode. ``check_env`` and the adapters use
  it to drive an env; without it they send the text action ``"0"``.
* ``tools: list[dict]`` (optional): OpenAI function schemas for tool-use envs.

Example:
    >>> import areal_agents as aa
    >>> class Hello(aa.AgentEnv):
    ...     '''Says hello.'''
    >>> spec = aa.register("DocHello-v0", Hello)
    >>> aa.spec("DocHello-v0").description
    'Says hello.'
    >>> del aa.registry["DocHello-v0"]
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from .env import AgentEnv, MultiAgentEnv
from .errors import RegistryError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "areal_agents.envs"

EnvCreator = Callable[..., AgentEnv | MultiAgentEnv]


@dataclasses.dataclass
class EnvSpec:
    """How to build a registered env.

    Attributes:
        id: the env id, e.g. ``"Countdown-v0"``.
        entry_point: ``"module:Class"`` or a callable returning an env.
        kwargs: default keyword arguments for the constructor (``make`` kwargs override them).
        max_episode_steps: when set, ``make`` wraps the env in ``TimeLimit``.
        description: one line for ``areal-agents envs``; defaults to the first docstring line
            of the class.
    """

    id: str
    entry_point: str | EnvCreator
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_episode_steps: int | None = None
    description: str = ""

    def load(self) -> EnvCreator:
        """Resolve the entry point to a callable (imports its module)."""
        if callable(self.entry_point):
            return self.entry_point
        module_name, sep, attr = self.entry_point.partition(":")
        if not sep or not module_name or not attr:
            raise RegistryError(
                f"{self.id}: entry point {self.entry_point!r} is not of the form 'module:Class'"
            )
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def multi_agent(self) -> bool:
        """Whether the entry point builds a ``MultiAgentEnv`` (False for opaque factories)."""
        creator = self.load()
        return isinstance(creator, type) and issubclass(creator, MultiAgentEnv)

    def make(self, **kwargs: Any) -> AgentEnv | MultiAgentEnv:
        """Build the env as ``make(self.id, **kwargs)`` does."""
        creator = self.load()
        env = creator(**{**self.kwargs, **kwargs})
        if not isinstance(env, AgentEnv | MultiAgentEnv):
            raise RegistryError(
                f"{self.id}: entry point returned {type(env).__name__}, "
                "expected an AgentEnv or MultiAgentEnv"
            )
        made = dataclasses.replace(self, kwargs={**self.kwargs, **kwargs})
        env.unwrapped.spec = made
        if self.max_episode_steps is not None:
            from .wrappers import TimeLimit

            env = TimeLimit(env, self.max_episode_steps)
        env.spec = made
        return env


def _first_doc_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class _Registry(dict[str, EnvSpec]):
    """``{id: EnvSpec}``; lookups first load the built-in envs and entry points (once)."""

    _loaded = False
    _loading = False

    def _ensure_loaded(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            importlib.import_module("areal_agents.envs")
            load_entry_points()
        finally:
            self._loading = False
            self._loaded = True

    def __getitem__(self, key: str) -> EnvSpec:
        self._ensure_loaded()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._ensure_loaded()
        return super().__contains__(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self._ensure_loaded()
        return super().__iter__()

    def __len__(self) -> int:
        self._ensure_loaded()
        return super().__len__()

    def keys(self):  # type: ignore[no-untyped-def]
        self._ensure_loaded()
        return super().keys()

    def values(self):  # type: ignore[no-untyped-def]
        self._ensure_loaded()
        return super().values()

    def items(self):  # type: ignore[no-untyped-def]
        self._ensure_loaded()
        return super().items()

    def get(self, key: str, default: Any = None) -> Any:
        self._ensure_loaded()
        return super().get(key, default)


registry: _Registry = _Registry()


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every entry point of ``group``; returns their names. Failures are logged, not raised."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:
            logger.warning("areal_agents: env entry point %r failed to load: %s", ep.name, exc)
            continue
        loaded.append(ep.name)
    return loaded


def register(
    id: str,
    entry_point: str | EnvCreator,
    *,
    max_episode_steps: int | None = None,
    description: str | None = None,
    **kwargs: Any,
) -> EnvSpec:
    """Register an env id.

    Args:
        id: unique env id, e.g. ``"MyGame-v0"``.
        entry_point: ``"package.module:Class"`` (imported on ``make``) or a callable.
        max_episode_steps: wrap made envs in ``TimeLimit(env, max_episode_steps)``.
        description: one line for listings; default: first docstring line of the class.
        **kwargs: default constructor kwargs.

    Returns:
        The new ``EnvSpec``.

    Raises:
        RegistryError: ``id`` is already registered.
    """
    if dict.__contains__(registry, id):
        raise RegistryError(
            f"env id {id!r} is already registered (by {dict.__getitem__(registry, id).entry_point!r}); "
            "choose another id or bump its version suffix"
        )
    if not isinstance(entry_point, str) and not callable(entry_point):
        raise TypeError(f"entry_point must be 'module:Class' or a callable, got {entry_point!r}")
    new = EnvSpec(id, entry_point, dict(kwargs), max_episode_steps, description or "")
    if description is None:
        target = entry_point if callable(entry_point) else None
        if target is None:
            try:
                target = new.load()
            except Exception:  # resolved lazily on make(); keep registration cheap
                target = None
        new.description = _first_doc_line(target) if target is not None else ""
    dict.__setitem__(registry, id, new)
    return new


def spec(id: str) -> EnvSpec:
    """The ``EnvSpec`` of ``id``.

    Raises:
        RegistryError: unknown id (the message suggests close matches).
    """
    registry._ensure_loaded()
    if not dict.__contains__(registry, id):
        close = difflib.get_close_matches(id, list(dict.keys(registry)), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(
            f"no env registered with id {id!r}{hint} (`areal-agents envs` lists the ids)"
        )
    return dict.__getitem__(registry, id)


def make(id: str, **kwargs: Any) -> AgentEnv | MultiAgentEnv:
    """Build a registered env.

    Args:
        id: a registered id.
        **kwargs: constructor kwargs, overriding the registered defaults.

    Returns:
        The env with ``env.spec`` set, wrapped in ``TimeLimit`` if the spec has
        ``max_episode_steps``.

    Raises:
        RegistryError: unknown id (with a did-you-mean suggestion).
    """
    return spec(id).make(**kwargs)
