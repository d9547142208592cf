"""The ``areal-agents`` CLI: envs table, check-env report and exit codes, command table."""

from __future__ import annotations

import argparse

import pytest

from areal_agents import cli


def test_envs_lists_ids_with_descriptions(capsys):
    assert cli.main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "Countdown-v0" in out and "single-agent" in out
    assert "Reach a target" in out  # Countdown's one-line description


def test_check_env_passes(capsys):
    assert cli.main(["check-env", "Countdown-v0"]) == 0
    out = capsys.readouterr().out
    assert "check_env(Countdown-v0): PASS" in out and "ok    from_spec" in out


def test_check_env_unknown_id_suggests(capsys):
    assert cli.main(["check-env", "Countdwn-v0"]) == 2
    assert "did you mean 'Countdown-v0'" in capsys.readouterr().out


def test_check_env_failure_exits_1(monkeypatch, capsys):
    import areal_agents as aa
    from areal_agents.testing import GenericTestEnv

    def flaky(env):
        import random

        return [{"role": "user", "content": str(random.random())}], {}

    aa.register("CliFlaky-v0", lambda: GenericTestEnv(reset_fn=flaky))
    try:
        assert cli.main(["check-env", "CliFlaky-v0"]) == 1
    finally:
        dict.pop(aa.registry, "CliFlaky-v0")
    assert "FAIL  types_and_determinism" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_command_table_is_extensible(monkeypatch, capsys):
    def add_hello(sub: argparse._SubParsersAction) -> None:
        sub.add_parser("hello").set_defaults(func=lambda args: 7)

    import sys
    import types

    mod = types.ModuleType("fake_cli_hello")
    mod.add_parser = add_hello  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_cli_hello", mod)
    monkeypatch.setitem(cli._COMMANDS, "hello", "fake_cli_hello:add_parser")
    monkeypatch.setitem(cli._COMMANDS, "broken", "no_such_module_xyz:add_parser")
    assert cli.main(["hello"]) == 7
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "unavailable" in capsys.readouterr().out


def test_a_config_mistake_exits_2_with_the_message_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("env: Signaling-v0\n"
                      "policies:\n"
                      "  a: {model: 'tiny:xs', inference: {kind: server, transport: nccl}}\n"
                      "policy_map: {speaker: a, listener: a}\n")
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config:\n")
    assert ("kind='server' cannot use transport='nccl'; choose one of ['shm', 'disk', 'gloo']"
            in err) and "Traceback" not in err


def test_train_with_env_kwargs_the_env_refuses_exits_2_naming_them(tmp_path, capsys):
    """An env constructor's ValueError / TypeError on the YAML's env_kwargs is a
    configuration mistake: exit 2 with the env's message, not a traceback."""
    from areal_agents.cli import main

    base = ("env: SolverJudge-v0\nenv_kwargs: {digits: 1, %s}\npolicies:\n"
            "  p: {model: 'tiny:xs', api: completions, sampling: {max_tokens: 2}}\n"
            "policy_map: {solver: p, judge: p}\ntrainer: {batch_size: 4, group_size: 2, steps: 1}\n"
            f"run_dir: {tmp_path / 'run'}\n")
    for kwargs, message in (("judge_sees_reference: 'yes'", "judge_sees_reference must be a bool"),
                            ("no_such_option: 1", "unexpected keyword argument 'no_such_option'")):
        config = tmp_path / "bad.yaml"
        config.write_text(base % kwargs)
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: the env 'SolverJudge-v0' could not be built with env_kwargs=")
        assert message in err and "fix env_kwargs" in err and "Traceback" not in err
