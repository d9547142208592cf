"""Model ids resolve through the local Hugging Face cache (never the network); the dtype
default; the checkpoint's generation_config EOS ids stop LocalEngine."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from areal_agents.config import load_config
from areal_agents.engines import GenerateRequest, SamplingParams
from areal_agents.engines.local import LocalEngine
from areal_agents.errors import ConfigError
from areal_agents.models import load, resolve_checkpoint, save_tiny, tiny
from areal_agents.trainers.policy import Policy

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, **save_kwargs) -> Path:
    """Save a tiny model as ``repo_id`` in the HF cache layout; returns its snapshot dir."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = save_tiny(repo / "snapshots" / COMMIT, **save_kwargs)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test (a hub lookup would open one)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_hub_id_loads_from_hf_hub_cache(hub_env, monkeypatch, no_network):
    snapshot = fake_hub_cache(hub_env / "cache", "acme/Tiny-0.5M", seed=3)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    assert resolve_checkpoint("acme/Tiny-0.5M") == snapshot
    model, tokenizer = load("acme/Tiny-0.5M")
    assert torch.equal(model.lm_head.weight, tiny("xs", seed=3)[0].lm_head.weight)
    assert tokenizer.eos_token == "<|im_end|>" and "im_start" in tokenizer.chat_template
    model, _ = Policy(model="acme/Tiny-0.5M").load()
    assert torch.equal(model.lm_head.weight, tiny("xs", seed=3)[0].lm_head.weight)


def test_hub_id_honours_hf_home_and_yaml(hub_env, monkeypatch, no_network):
    fake_hub_cache(hub_env / "home" / "hub", "acme/Tiny-0.5M", seed=1)
    monkeypatch.setenv("HF_HOME", str(hub_env / "home"))
    yaml_file = hub_env / "run.yaml"
    yaml_file.write_text("env: Arithmetic-v0\npolicies:\n  solver: {model: acme/Tiny-0.5M}\n"
                         "policy_map: {agent: solver}\n")
    cfg = load_config(yaml_file)
    model, _ = Policy(**cfg.policies["solver"].model_dump()).load()
    assert torch.equal(model.lm_head.weight, tiny("xs", seed=1)[0].lm_head.weight)


def test_absent_hub_id_names_cache_and_download_command(hub_env, monkeypatch, no_network):
    cache = hub_env / "empty-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    searched = str(cache / "models--Qwen--Qwen3-0.6B")
    with pytest.raises(ConfigError) as info:
        Policy(model="Qwen/Qwen3-0.6B").load()
    message = str(info.value)
    assert message.startswith("model 'Qwen/Qwen3-0.6B' is not a directory and not in the local "
                              f"Hugging Face cache (searched {searched!r}): download it first "
                              "with `hf download Qwen/Qwen3-0.6B` (or `huggingface-cli download "
                              "Qwen/Qwen3-0.6B`)")


def test_incomplete_snapshot_is_named(hub_env, monkeypatch, no_network):
    snapshot = fake_hub_cache(hub_env / "cache", "acme/Tiny-0.5M")
    (snapshot / "config.json").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    with pytest.raises(ConfigError, match=r"has no config.json \(an incomplete download\?\)"):
        load("acme/Tiny-0.5M")


def test_missing_paths_stay_file_not_found(hub_env):
    for path in ("/nonexistent/checkpoint", "./ckpt", "runs/a/weights"):
        with pytest.raises(FileNotFoundError, match="no checkpoint at"):
            load(path)


def test_dtype_defaults_to_float32_on_cpu(tmp_path):
    model, _ = tiny("xs")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tiny("xs")[1].save_pretrained(tmp_path / "bf16")
    assert load(tmp_path / "bf16")[0].lm_head.weight.dtype == torch.float32
    assert load(tmp_path / "bf16", dtype="auto")[0].lm_head.weight.dtype == torch.bfloat16
    assert load(tmp_path / "bf16", torch_dtype="fp16")[0].lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match=r"unknown dtype 'half8'"):
        load(tmp_path / "bf16", dtype="half8")
    with pytest.raises(ValueError, match="not both"):
        load(tmp_path / "bf16", dtype="bf16", torch_dtype="bf16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dtype_defaults_to_bfloat16_on_cuda(tmp_path):
    save_tiny(tmp_path / "ckpt")
    model, _ = load(tmp_path / "ckpt", device="cuda")
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.device.type == "cuda"
    assert load("tiny:xs", device="cuda")[0].lm_head.weight.dtype == torch.bfloat16


async def test_every_generation_config_eos_id_stops_local_engine(tmp_path):
    model, tokenizer = tiny("xs", seed=0)
    prompt = tokenizer.encode("Answer:")
    request = GenerateRequest(prompt, SamplingParams(max_tokens=12, temperature=0))
    async with LocalEngine(model, tokenizer) as engine:
        free = (await engine.generate(request)).outputs[0]
    second_eos = free.token_ids[3]  # a token greedy decoding emits: make it a stop id
    assert second_eos != tokenizer.eos_token_id
    save_tiny(tmp_path / "ckpt", seed=0)
    config_file = tmp_path / "ckpt" / "generation_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, second_eos]
    config_file.write_text(json.dumps(config))
    async with LocalEngine(str(tmp_path / "ckpt")) as engine:
        assert engine.eos_token_ids == {tokenizer.eos_token_id, second_eos}
        out = (await engine.generate(request)).outputs[0]
    first = free.token_ids.index(second_eos)
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


async def test_trainer_serves_a_hub_id_and_stops_on_every_eos_id(hub_env, monkeypatch):
    snapshot = fake_hub_cache(hub_env / "cache", "acme/Tiny-0.5M", seed=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env / "cache"))
    eos = tiny("xs")[1].eos_token_id
    config_file = snapshot / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "eos_token_id": [eos, 7]}))
    yaml_file = hub_env / "run.yaml"
    yaml_file.write_text("env: Arithmetic-v0\npolicies:\n  solver: {model: acme/Tiny-0.5M}\n"
                         f"policy_map: {{agent: solver}}\nrun_dir: {hub_env / 'run'}\n"
                         "logging: {progress: false, tensorboard: false}\n")
    trainer = load_config(yaml_file).build()
    try:
        await trainer.setup()
        assert trainer.gateway.policies["solver"].stop_ids == {eos, 7}
    finally:
        await trainer.aclose()
