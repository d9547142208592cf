"""Cheap unique ids for names that are not secrets (requests, completions, sessions, episodes).

``uuid.uuid4()`` reads the OS entropy pool on every call, a system call that took ~80 us on
the 2-core benchmark machine (four per episode in ``benchmarks/vs_trl.py``). ``new_id`` draws
8 random bytes once per process (again in a forked child, so parent and child never share
ids) and appends a counter: 32 hex characters like ``uuid4().hex``, unique across processes
with overwhelming probability, but *predictable* to anyone who has seen one id. Never use it
for something that grants access: keys come from ``secrets`` (``gateway/auth.py:
new_secret``); a session id only names a session, its key authorizes.

Example:
    >>> a, b = new_id(), new_id()
    >>> len(a), a != b, a[:16] == b[:16]
    (32, True, True)
"""

from __future__ import annotations

import itertools
import os
import secrets

__all__ = ["new_id"]

_prefix = ""
_counter = itertools.count()


def _reseed() -> None:
    """A fresh random prefix and counter (at import, and in the child after ``fork``)."""
    global _prefix, _counter
    _prefix = secrets.token_hex(8)
    _counter = itertools.count()


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A unique, NOT secret, 32-hex-character id: the process prefix, then a counter.

    Thread-safe: ``next`` on an ``itertools.count`` is atomic under the GIL.
    """
    return f"{_prefix}{next(_counter):016x}"
