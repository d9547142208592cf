"""Archon pipeline (pp=2) and expert (ep=2, tiny MoE) parallelism through the Trainer from
YAML: per-step losses equal the one-process run's; layouts the backend cannot run are refused
by the placement."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import transformers

from areal_agents.cli import main
from areal_agents.errors import ConfigError
from areal_agents.models import save_tiny, tiny_tokenizer
from areal_agents.models.tiny import SIZES, VOCAB_SIZE
from areal_agents.trainers.policy import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "signaling"


@pytest.mark.parametrize(("train", "message"), [
    ({"world_size": 4, "pp": 2},
     "Policy.train: archon runs pp only alone (got dp=2, pp=2); supported layouts: dp, ep, tp "
     "combined, or pp alone; set world_size=2 with only pp, or pp=1"),
    ({"world_size": 4, "tp": 2, "pp": 2},
     "Policy.train: archon runs pp only alone (got tp=2, pp=2); supported layouts: dp, ep, tp "
     "combined, or pp alone; set world_size=2 with only pp, or pp=1"),
])
def test_archon_refuses_pipeline_with_other_degrees(train, message):
    with pytest.raises(ConfigError) as info:
        Policy(backend="archon", train=train)
    assert str(info.value) == message


def _speaker(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[f"policy/speaker/{key}"] for row in rows if f"policy/speaker/{key}" in row]


def save_tiny_moe(path: Path) -> Path:
    """The checkpoint ``examples/signaling/archon_ep2.yaml``'s comment saves: a seeded 2-layer
    Qwen3-MoE (4 experts, top-2, no router aux loss) over the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    config = transformers.Qwen3MoeConfig(
        **{**SIZES["xs"], "intermediate_size": 128}, vocab_size=VOCAB_SIZE, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    transformers.set_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(("yaml", "layout"), [("archon_pp2.yaml", "{world_size: 2, pp: 2}"),
                                             ("archon_ep2.yaml", "{world_size: 2, ep: 2}")])
def test_archon_pp2_and_ep2_runs_match_one_process(yaml, layout, tmp_path):
    model = (save_tiny(tmp_path / "tiny_xs_untied", tie_word_embeddings=False)
             if yaml == "archon_pp2.yaml" else save_tiny_moe(tmp_path / "tiny_moe"))
    for name, train in [("workers", layout), ("single", "{world_size: 1}")]:
        assert main(["train", str(EXAMPLES / yaml), f"run_dir={tmp_path / name}",
                     f"policies.speaker.model={model}",
                     f"policies.speaker.train={train}"]) == 0
    losses, want = _speaker(tmp_path / "workers", "loss"), _speaker(tmp_path / "single", "loss")
    assert len(losses) == len(want) == 3
    assert any(abs(v) > 1e-3 for v in want), want  # a real signal, not all-zero advantages
    assert losses == pytest.approx(want, abs=1e-4)
    assert _speaker(tmp_path / "workers", "reward") == _speaker(tmp_path / "single", "reward")
    assert multiprocessing.active_children() == []
