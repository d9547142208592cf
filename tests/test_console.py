"""The console: start-up phases, the progress bar's labelled train/eval rows at 80 columns, and
``areal-agents train``'s one-line configuration errors (traceback behind ``--debug``)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from areal_agents import cli
from areal_agents.errors import ConfigError, RegistryError
from areal_agents.metrics import Progress, Startup

AGENTS = ["speaker", "listener", "judge", "critic_one", "critic_two", "observer"]
HEADLINE = [f"{split}/{a}/success" for split in ("train", "eval") for a in AGENTS]


def console(width: int = 80) -> Console:
    return Console(file=io.StringIO(), width=width, color_system=None)


def render(renderable, width: int = 80) -> list[str]:
    out = console(width)
    out.print(renderable)
    return out.file.getvalue().splitlines()


def test_progress_labels_train_and_eval_apart_within_80_columns():
    bar = Progress(10, HEADLINE, console=console())
    try:
        bar.update(0, {f"eval/{a}/success": 0.25 for a in AGENTS})  # the step-0 evaluation
        bar.update(3, {f"train/{a}/success": 0.5 for a in AGENTS} | {"other": 1.0})
        lines = render(bar._bar.get_renderable())
    finally:
        bar.close()
    assert all(len(line) <= 80 for line in lines), lines
    assert re.match(r"step ━+╸? +3/10 ", lines[0])
    train = next(i for i, line in enumerate(lines) if line.startswith("train "))
    evals = next(i for i, line in enumerate(lines) if line.startswith("eval "))
    assert train < evals
    train_text = " ".join(line.strip() for line in lines[train:evals])
    eval_text = " ".join(line.strip() for line in lines[evals:])
    assert "speaker/success 0.5" in train_text and "observer/success 0.5" in train_text
    assert "speaker/success 0.25" in eval_text and eval_text.endswith("(step 0)")
    assert "0.25" not in train_text and "0.5 " not in eval_text
    # wrapped rows stay in the values column, under their label
    assert all(line.startswith(" " * 6) for line in lines[train + 1:evals])


def test_progress_keeps_the_last_eval_until_the_next_one():
    bar = Progress(10, HEADLINE[:1] + HEADLINE[6:7], console=console())
    try:
        bar.update(2, {"train/speaker/success": 0.1, "eval/speaker/success": 0.3})
        bar.update(3, {"train/speaker/success": 0.2})
        assert bar.shown == {"train/speaker/success": 0.2, "eval/speaker/success": 0.3}
        assert bar.eval_step == 2
        bar.update(4, {"eval/speaker/success": 0.4})
        assert bar.eval_step == 4 and bar.shown["eval/speaker/success"] == 0.4
    finally:
        bar.close()


def test_disabled_progress_and_startup_print_nothing(capsys):
    bar = Progress(3, HEADLINE, enabled=False)
    bar.update(1, {"train/speaker/success": 1.0})
    bar.close()
    with Startup(enabled=False).phase("loading"):
        pass
    assert capsys.readouterr() == ("", "")


def test_startup_phase_says_what_is_built_and_how_long_it_took():
    out = console()
    startup = Startup(console=out)
    with startup.phase("loading model tiny:xs for policy [s]"):
        pass
    assert re.fullmatch(r"loading model tiny:xs for policy \[s\] \.\.\.\n"
                        r"✓ loading model tiny:xs for policy \[s\]  \d+\.\d s\n",
                        out.file.getvalue())


def test_startup_phase_writes_to_stderr_by_default(capsys):
    with Startup().phase("building engines"):
        pass
    captured = capsys.readouterr()
    assert captured.out == "" and "✓ building engines" in captured.err


@pytest.mark.slow
async def test_trainer_setup_reports_each_phase(capsys):
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    sampling = {"temperature": 1.0, "max_tokens": 1}
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"s": Policy(lr=3e-3, sampling=sampling, api="completions", sft_steps=1),
                  "l": Policy(lr=3e-3, seed=1, sampling=sampling, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, batch_size=2, group_size=2,
        warm_start={"episodes": 2, "players": {"speaker": "random", "listener": "random"}},
        eval_every=1, eval_seeds=[100, 101])
    try:
        await trainer.afit(1)
    finally:
        await trainer.aclose()
    err = capsys.readouterr().err
    for phase in ["collecting 2 warm-start demo episodes", "loading model tiny:xs for policy l",
                  "loading model tiny:xs for policy s", "SFT warm start of s (1 steps)",
                  "building the fsdp train engine of s", "building the inference engines of l",
                  "step-0 evaluation on 2 seeds"]:
        assert re.search(rf"✓ {re.escape(phase)}  \d+\.\d s", err), (phase, err)
    assert "SFT warm start of l" not in err  # l has no SFT steps


BAD_ENV = ("env: Nope-v0\npolicies: {a: {model: 'tiny:xs'}}\npolicy_map: {agent: a}\n"
           "run_dir: {run_dir}\n")


@pytest.mark.parametrize("text, message", [
    (BAD_ENV, "error: no env registered with id 'Nope-v0'; did you mean"),
    ("env: [Signaling-v0\n", "error: {path}: line 2, column 1: invalid YAML: expected ',' or ']'"),
    (None, "error: config file {path} not found (train takes a YAML run config"),
])
def test_train_config_errors_are_one_line_and_debug_shows_the_traceback(
        tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text.replace("{run_dir}", str(tmp_path / "run")))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(path=path)) and err.count("\n") == 1, err
    with pytest.raises((ConfigError, RegistryError)):
        cli.main(["train", str(path), "--debug"])
    with pytest.raises((ConfigError, RegistryError)):
        cli.main(["--debug", "train", str(path)])
