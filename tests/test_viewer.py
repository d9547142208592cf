"""The trajectory viewer: the trainer's bounded sample record, the HTML page, ``areal-agents
view`` and a headless-Chromium screenshot of the page."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from areal_agents import cli
from areal_agents.errors import ConfigError
from areal_agents.samples import Sample
from areal_agents.trainers.sample_log import SampleLog
from areal_agents.viewer import load_samples, logprob_colour, render_html, write_view

EVIL = "<script>alert(1)</script>"


class WordTokenizer:
    """Decodes id ``i`` to ``WORDS[i]``."""

    WORDS = ("<|im_start|>", "user", "\n", "pick", " A", " B", EVIL, "<|im_end|>")

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(self.WORDS[i] for i in row) for row in ids]


def sample(seed: int, reward: float, agent: str = "speaker") -> Sample:
    # prompt (3 tokens, masked) then 3 generated tokens sampled at versions 1, 2, 2
    return Sample(token_ids=[0, 1, 2, 4, 6, 7], loss_mask=[0, 0, 0, 1, 1, 1],
                  logprobs=[0.0, 0.0, 0.0, -0.1, -2.5, -7.0], versions=[-1, -1, -1, 1, 2, 2],
                  reward=reward, agent=agent, policy="s", group=str(seed),
                  meta={"episode": f"ep{seed}"})


def record(run_dir, per_policy=2, num_samples=5, step=3):
    log = SampleLog(run_dir, per_policy)
    samples = [sample(seed=10 + i, reward=float(i % 2)) for i in range(num_samples)]
    log.attach({"s": samples}, {"speaker": [{"role": "user", "content": f"say {EVIL}"},
                                            {"role": "assistant", "content": "A"}]})
    advantages = torch.zeros(num_samples, 8)  # [batch, seq]: padded past each sample
    advantages[:, 3:6] = torch.arange(num_samples, dtype=torch.float32)[:, None] - 1.5
    log.stage("s", samples, advantages, version=2, tokenizer=WordTokenizer())
    return log.flush(step, ["s"])


def test_sample_log_keeps_a_bounded_evenly_spaced_choice(tmp_path):
    path = record(tmp_path, per_policy=2, num_samples=5)
    assert path == tmp_path / "samples" / "step_3.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task_seed"] for r in rows] == [10, 12]  # rows 0 and 2 of 5
    first = rows[0]
    assert first["step"] == 3 and first["policy"] == "s" and first["agent"] == "speaker"
    assert first["policy_version"] == 2 and first["episode"] == "ep10"
    assert first["tokens"] == ["<|im_start|>", "user", "\n", " A", EVIL, "<|im_end|>"]
    assert first["token_ids"] == [0, 1, 2, 4, 6, 7]
    assert first["loss_mask"] == [0, 0, 0, 1, 1, 1] and first["versions"] == [-1, -1, -1, 1, 2, 2]
    assert first["logprobs"] == [0.0, 0.0, 0.0, -0.1, -2.5, -7.0]
    assert first["advantages"] == [0.0, 0.0, 0.0, -1.5, -1.5, -1.5]  # cut to the sample's length
    assert first["advantage"] == -1.5 and rows[1]["advantage"] == 0.5
    assert first["messages"][0] == {"role": "user", "content": f"say {EVIL}"}
    assert log_is_empty_after_flush(tmp_path)


def log_is_empty_after_flush(run_dir) -> bool:
    log = SampleLog(run_dir, 2)
    log.stage("s", [sample(1, 0.0)], None, version=0, tokenizer=WordTokenizer())
    log.flush(1, ["s"])
    return log.flush(2, ["s"]) is None  # staged rows are written once


def test_sample_log_off_and_bad_size(tmp_path):
    log = SampleLog(tmp_path, 0)
    log.stage("s", [sample(1, 0.0)], None, version=0, tokenizer=WordTokenizer())
    assert log.flush(1, ["s"]) is None and not (tmp_path / "samples").exists()
    assert SampleLog(None, 4).flush(1, ["s"]) is None  # no run_dir: nothing to write to
    with pytest.raises(ConfigError, match=r"record_samples must be >= 0 \(0 = off\), got -1"):
        SampleLog(tmp_path, -1)


def test_page_shows_tokens_values_and_escapes_text(tmp_path):
    record(tmp_path)
    page = render_html(load_samples(tmp_path), "run <b>x</b>")
    assert page.count("<script>") == 1  # only the page's own filter script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and EVIL not in page
    assert "say &lt;script&gt;" in page  # the transcript message, escaped
    assert "run &lt;b&gt;x&lt;/b&gt;" in page
    # a generated token: heat-map colour of its log-prob, tooltip values, staleness 2 - 1 = 1
    assert (f'<span class="t" style="background:{logprob_colour(-0.1)}" title="id 4 · log-prob '
            '-0.100 · version 1 · staleness 1 · advantage -1.500"> A</span><sub class="s">1</sub>'
            in page)
    assert '<span class="t m" title="id 1 &middot; prompt/tool (not trained)">user</span>' in page
    assert "\u21b5\n" in page  # a newline token stays visible
    assert "policy s · agent speaker" in page and "step 3 · 2 sample(s)" in page
    assert "advantage <b><span class=\"neg\">-1.5</span>" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched


def test_logprob_colour_scale():
    assert logprob_colour(0.0) == "hsl(120,70%,78%)"  # certain: green
    assert logprob_colour(-3.0) == "hsl(60,70%,78%)"
    assert logprob_colour(-6.0) == logprob_colour(-50.0) == "hsl(0,70%,78%)"  # floor: red


def test_view_cli_writes_the_page_and_filters_steps(tmp_path, capsys):
    record(tmp_path, step=1)
    record(tmp_path, step=2)
    out = tmp_path / "page.html"
    assert cli.main(["view", str(tmp_path), "--out", str(out), "--steps", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "step 2 · 2 sample(s)" in page and "step 1 ·" not in page
    assert cli.main(["view", str(tmp_path), "--steps", "7-8"]) == 2
    assert ("error: no recorded samples at steps [7, 8]; " in capsys.readouterr().err)
    assert cli.main(["view", str(tmp_path), "--steps", "x"]) == 2
    assert "'x' is not a step or a range a-b" in capsys.readouterr().err


def test_view_cli_without_samples_names_the_setting(tmp_path, capsys):
    assert cli.main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trainer.record_samples > 0" in err


def test_view_cli_on_a_missing_run_dir_says_it_does_not_exist(tmp_path, capsys):
    assert cli.main(["view", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'typo'} does not exist" in err and "record_samples" not in err


@pytest.mark.slow
async def test_trainer_records_trained_samples_per_step(tmp_path):
    from areal_agents.trainers.policy import Policy
    from areal_agents.trainers.trainer import Trainer

    sampling = {"temperature": 1.0, "max_tokens": 1}
    trainer = Trainer(
        env="Signaling-v0", env_kwargs={"num_items": 2, "pool_size": 2},
        policies={"s": Policy(lr=3e-3, sampling=sampling, api="completions"),
                  "l": Policy(lr=3e-3, seed=1, sampling=sampling, api="completions")},
        policy_map={"speaker": "s", "listener": "l"}, batch_size=4, group_size=2,
        run_dir=tmp_path, progress=False, record_samples=3)
    try:
        await trainer.afit(2)
    finally:
        await trainer.aclose()
    for step in (1, 2):
        rows = [json.loads(x) for x in (tmp_path / "samples" / f"step_{step}.jsonl").open()]
        assert sorted(r["policy"] for r in rows) == ["l"] * 3 + ["s"] * 3  # 3 of 4 per policy
        for r in rows:
            n = len(r["token_ids"])
            assert len(r["tokens"]) == len(r["loss_mask"]) == len(r["logprobs"]) == n
            assert r["policy_version"] == step - 1  # synchronous: trained at version step - 1
            assert {v for v, m in zip(r["versions"], r["loss_mask"], strict=True) if m} == {
                step - 1}
            assert r["agent"] == {"s": "speaker", "l": "listener"}[r["policy"]]
            assert r["messages"] and r["messages"][-1]["role"] == "assistant"
            assert isinstance(r["advantage"], float) and isinstance(r["task_seed"], int)
    page = write_view(tmp_path).read_text()
    assert "policy l · agent listener" in page and "policy s · agent speaker" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for the screenshot "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_page_renders_in_headless_chromium(tmp_path):
    image = pytest.importorskip("PIL.Image")
    record(tmp_path)
    page = write_view(tmp_path)
    png = tmp_path / "viewer.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={png}", "--window-size=1000,700", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert png.exists()
    pixels = image.open(png).convert("L")
    assert pixels.size == (1000, 700)
    counts = pixels.histogram()  # 256 grey levels
    total = sum(counts)
    mean = sum(v * n for v, n in enumerate(counts)) / total
    variance = sum((v - mean) ** 2 * n for v, n in enumerate(counts)) / total
    assert variance > 100, f"the screenshot looks blank (pixel variance {variance:.1f})"
    colours = image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert any(g > r + 40 and g > b + 40 for _, (r, g, b) in colours)  # a green heat-map token
