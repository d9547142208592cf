"""API keys: one admin secret per gateway and one secret key per session.

The admin key is compared with ``hmac.compare_digest``; session keys are stored only as their
SHA-256 digests, so the key table never holds a usable secret and lookups do not leak timing
about the key's characters.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from .errors import unauthorized


def new_secret(prefix: str) -> str:
    """A fresh random key such as ``"aa-admin-<43 url-safe chars>"``."""
    return f"{prefix}-{secrets.token_urlsafe(32)}"


@lru_cache(maxsize=4096)
def digest(key: str) -> str:
    """SHA-256 hex digest of a key (the form session keys are stored in).

    Memoised (the recent keys' digests): an in-process episode looks its session up by key
    about five times. The digest is a pure function of the key, so a hit is the same string;
    authentication still goes through the gateway's live key tables."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin, or the holder of one session's key."""

    kind: Literal["admin", "session"]
    session_id: str | None = None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when absent)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(token: str | None, admin_key: str, session_ids_by_digest: dict[str, str]
                 ) -> Principal:
    """Resolve a bearer token to a ``Principal``.

    Raises:
        GatewayError: 401 when the token is missing or matches neither the admin key nor a
            session key.
    """
    if token is None:
        raise unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' with a session key from "
            "POST /rl/sessions or the gateway's admin key"
        )
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return Principal("admin")
    session_id = session_ids_by_digest.get(digest(token))
    if session_id is None:
        raise unauthorized(
            "invalid API key: it is neither the admin key nor a live session key "
            "(create a session with POST /rl/sessions)"
        )
    return Principal("session", session_id)
