"""``areal_agents.ids.new_id``: unique non-secret ids without a system call per id, used for
requests, completions, sessions and episodes; session KEYS still come from ``secrets``."""

from __future__ import annotations

import os
import secrets
import threading

import pytest

from areal_agents.engines.base import GenerateRequest
from areal_agents.gateway.auth import new_secret
from areal_agents.gateway.sessions import Session
from areal_agents.ids import new_id


@pytest.fixture
def no_urandom(monkeypatch):
    """``os.urandom`` refuses (uuid4 and secrets read it); yields the calls it refused."""
    calls = []

    def refuse(n):
        calls.append(n)
        raise AssertionError("os.urandom called")

    monkeypatch.setattr(os, "urandom", refuse)
    return calls


def test_ids_are_32_hex_chars_and_unique_across_threads():
    out: list[list[str]] = [[] for _ in range(4)]

    def take(i: int) -> None:
        out[i].extend(new_id() for _ in range(2000))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [x for chunk in out for x in chunk]
    assert len(set(ids)) == 8000
    assert all(len(x) == 32 and int(x, 16) >= 0 for x in ids)


def test_hot_path_ids_need_no_system_call(no_urandom):
    """Fails on uuid4 ids (one ``os.urandom`` read each)."""
    assert Session(policy="p").session_id.startswith("sess_")
    assert len(GenerateRequest(prompt_ids=[1, 2]).request_id) == 32
    assert new_id() != new_id()
    assert no_urandom == []


def test_session_keys_stay_cryptographically_random(monkeypatch):
    calls = []
    real = secrets.token_urlsafe
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: calls.append(n) or real(n))
    key = new_secret("aa-sess")
    assert calls == [32] and key.startswith("aa-sess-") and len(key) == len("aa-sess-") + 43


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_prefix():
    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave without running pytest's teardown
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child[:16] != parent[:16]
