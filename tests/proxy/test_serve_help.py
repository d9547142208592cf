"""`serve --help` and the start-up banner name the Responses route and session refresh."""

from __future__ import annotations

import pytest

from areal_agents.cli_serve import banner
from areal_agents.gateway import Gateway
from areal_agents.models import tiny_tokenizer
from areal_agents.testing.engine import ScriptedEngine


def test_serve_help_names_responses_and_refresh(capsys):
    from areal_agents.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "/v1/responses" in text and "Agents SDK" in text
    assert "/rl/sessions/$SESSION_ID/refresh" in text


def test_the_banner_names_responses_and_refresh():
    tok = tiny_tokenizer()
    gw = Gateway(admin_key="k")
    gw.add_policy("p", [ScriptedEngine(["ok"], tokenizer=tok)], tok)
    text = banner(gw, "127.0.0.1", 8123, show_key=False)
    assert "POST http://127.0.0.1:8123/v1/chat/completions (or /v1/responses)" in text
    assert "POST http://127.0.0.1:8123/rl/sessions/<session_id>/refresh" in text
