"""The training-backend registry: backend name -> ``TrainEngine`` factory, checked in one place.

``Policy.backend``, ``PolicyConfig.backend`` (YAML) and the ``Trainer`` all resolve names here,
so a backend registered once is accepted everywhere::

    from areal_agents.trainers.backends import register_backend
    register_backend("mine", "my_package.engine:MyEngine")   # or the class itself

A factory is called as ``factory(model, lr=..., lora=..., **Policy.train_kwargs)`` and returns a
``TrainEngine`` (``areal_agents.trainers.base``).

Example:
    >>> check_backend("fsdp")
    'fsdp'
    >>> check_backend("jax")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    areal_agents.errors.ConfigError: unknown backend 'jax'; registered: ['fsdp', 'archon', ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from areal_agents.errors import ConfigError

Factory = Callable[..., Any]

BACKENDS: dict[str, str | Factory] = {
    "fsdp": "areal_agents.trainers.fsdp.engine:FSDPEngine",
    "archon": "areal_agents.trainers.archon:ArchonEngine",
    "megatron": "areal_agents.trainers.megatron:MegatronEngine",
}
"""Backend name -> ``"module:Factory"`` (imported on first use) or the factory itself.
Add entries with ``register_backend``, not by editing this dict."""

_HOW_TO_REGISTER = ("register another with areal_agents.trainers.backends.register_backend("
                    "name, 'package.module:EngineClass') before building the Policy or config")


def register_backend(name: str, factory: str | Factory) -> None:
    """Register (or replace) training backend ``name``.

    Args:
        name: the value of ``Policy.backend`` / ``policies.<p>.backend`` that selects it.
        factory: ``"package.module:Factory"`` (imported lazily, when a Trainer builds the
            engine) or a callable ``factory(model, lr=..., lora=..., **kw) -> TrainEngine``.

    Raises:
        TypeError: ``name`` is not a non-empty string, or ``factory`` is neither a
            ``"module:attr"`` string nor callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty string, got {name!r}")
    if isinstance(factory, str):
        module, sep, attr = factory.partition(":")
        if not (module and sep and attr):
            raise TypeError(f"backend {name!r}: factory {factory!r} must look like "
                            "'package.module:EngineClass'")
    elif not callable(factory):
        raise TypeError(f"backend {name!r}: factory must be a 'module:attr' string or a callable,"
                        f" got {type(factory).__name__}")
    BACKENDS[name] = factory


def check_backend(name: str, where: str = "") -> str:
    """``name`` if it is a registered backend.

    Args:
        name: the backend name to check.
        where: the field being checked (``"Policy.backend"``), prefixed to the message.

    Raises:
        ConfigError: unknown name (lists the registered ones and how to register another).
    """
    if name not in BACKENDS:
        prefix = f"{where}={name!r}: " if where else ""
        raise ConfigError(f"{prefix}unknown backend {name!r}; registered: {list(BACKENDS)}; "
                          f"{_HOW_TO_REGISTER}")
    return name


def backend_factory(name: str) -> Factory:
    """The engine factory registered for backend ``name`` (importing it if needed).

    Raises:
        ConfigError: unknown backend, or its module/attribute cannot be imported here.
    """
    factory = BACKENDS[check_backend(name)]
    if not isinstance(factory, str):
        return factory
    module, _, attr = factory.partition(":")
    try:
        return getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"backend {name!r} is not available here ({exc}); use another of "
                          f"{list(BACKENDS)}") from exc
