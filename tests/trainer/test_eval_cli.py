"""``areal-agents eval RUN_DIR`` evaluates the run's trained weights: a run always saves its
final weights, and a run dir without any is refused (exit 2) instead of scoring an untrained
model."""

from __future__ import annotations

import json
import shutil

import torch
import yaml

from areal_agents.cli import main

CONFIG = {
    "env": "Signaling-v0",
    "env_kwargs": {"num_items": 2, "pool_size": 2},
    "policies": {name: {"model": "tiny:xs", "seed": seed, "lr": 3e-3, "api": "completions",
                        "sampling": {"temperature": 1.0, "max_tokens": 1}}
                 for name, seed in (("speaker", 0), ("listener", 1))},
    "policy_map": {"speaker": "speaker", "listener": "listener"},
    "trainer": {"batch_size": 4, "group_size": 2, "steps": 2, "eval_seeds": [100, 101]},
    "logging": {"tensorboard": False, "progress": False},
}


def test_train_saves_final_weights_and_eval_refuses_a_run_dir_without_any(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(CONFIG))  # checkpoint_every defaults to 0
    run_dir = tmp_path / "run"
    assert main(["train", str(config), f"run_dir={run_dir}"]) == 0
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_2"  # the final weights, never step_1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2"]
    state = json.loads((root / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    capsys.readouterr()

    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"eval/speaker/success", "eval/listener/success"}

    shutil.rmtree(root)  # e.g. a run from before final checkpoints, or one whose save failed
    assert main(["eval", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"error: {run_dir} has no saved weights ({root / 'latest'} is missing), so eval would "
        "score the untrained starting model; finish training it with `areal-agents train "
        f"{run_dir / 'config.yaml'} --resume` (a run saves its final weights), or evaluate the "
        f"starting model on purpose with `areal-agents eval {run_dir / 'config.yaml'}`\n")


def test_eval_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} is not a run directory (no config.yaml); pass the run_dir that "
        "`areal-agents train` wrote, or a YAML config\n")


async def test_the_final_checkpoint_is_skipped_when_the_last_step_was_just_saved(tmp_path):
    import areal_agents as aa

    trainer = aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": aa.Policy(lr=3e-3, api="completions",
                                       sampling={"temperature": 1.0, "max_tokens": 1})},
        policy_map={"speaker": "speaker"},
        agents={"listener": aa.agents.ScriptedAgent(lambda observation: "A")},
        batch_size=4, group_size=2, checkpoint_every=2, run_dir=tmp_path, progress=False)
    saved: list[int] = []
    save = trainer.save_checkpoint

    async def recording_save():
        saved.append(trainer.step)
        return await save()

    trainer.save_checkpoint = recording_save
    try:
        await trainer.afit(2)
        await trainer.afit(3)  # ends off the checkpoint_every grid: one final save
        await trainer.afit(3)  # nothing trained: nothing saved
        weights = dict(trainer.train_engines["speaker"].export_weights())
    finally:
        await trainer.aclose()
    assert saved == [2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_3"
    restored = aa.Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"speaker": aa.Policy(lr=3e-3, api="completions")},
        policy_map={"speaker": "speaker"},
        agents={"listener": aa.agents.ScriptedAgent(lambda observation: "A")},
        batch_size=4, group_size=2, run_dir=tmp_path, resume=True, progress=False)
    try:
        await restored.setup()
        served = restored.gateway.policies["speaker"].router.engines[0].model.state_dict()
    finally:
        await restored.aclose()
    assert restored.step == 3
    for name, tensor in weights.items():
        torch.testing.assert_close(served[name], tensor, rtol=0, atol=0, msg=name)
