"""The trajectory viewer: one static, self-contained HTML page of a run's recorded samples.

``write_view(run_dir)`` reads ``run_dir/samples/step_<n>.jsonl`` (written by the trainer's
``SampleLog``, ``areal_agents.trainers.sample_log``) and writes a page with, per policy and
agent, the sampled episodes of each step: the transcript's turns, then every token of the
trained sequence coloured by its behaviour log-prob (a heat map; the legend gives the scale),
prompt/tool tokens (loss mask 0) greyed, per-token staleness (the policy's version at train
time minus the version that sampled the token) as a subscript, rewards and advantages.
Everything is inline (CSS, a few lines of JS); nothing is fetched. All text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["load_samples", "logprob_colour", "parse_steps", "render_html", "write_view"]

LOGPROB_FLOOR = -6.0  # log-probs at or below this get the coldest colour

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:16px 0 4px}h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ccc}
.legend,.nav{margin:6px 0;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
.grad{display:inline-block;width:160px;height:12px;border:1px solid #999;vertical-align:middle;
background:linear-gradient(to right,hsl(120,70%,78%),hsl(60,70%,78%),hsl(0,70%,78%))}
.step>summary{font-weight:600;cursor:pointer;margin:8px 0}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:8px 0}
.meta{color:#444;font-size:13px;margin-bottom:6px}.meta b{color:#000}
.msg{margin:2px 0;font-size:13px;display:flex;gap:8px}.role{font-weight:600;min-width:70px}
.msg pre{margin:0;white-space:pre-wrap;font:inherit}
.tokens{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;
margin-top:6px;border-top:1px dashed #ddd;padding-top:6px}
.t{border-radius:2px;padding:0 1px;box-shadow:inset -1px 0 0 rgba(255,255,255,.9)}
.m{background:#e4e4e4;color:#888;box-shadow:none;padding:0;border-radius:0}
.s{font-size:9px;color:#b00;font-weight:700}.hide-stale .s{display:none}
.pos{color:#070}.neg{color:#a00}
"""

_JS = """
(function(){
  var sel=document.getElementById('agent'), box=document.getElementById('stale');
  sel.addEventListener('change',function(){
    document.querySelectorAll('section.group').forEach(function(s){
      s.style.display=(sel.value===''||s.dataset.agent===sel.value)?'':'none';});});
  box.addEventListener('change',function(){
    document.body.classList.toggle('hide-stale',!box.checked);});
})();
"""


def load_samples(run_dir: str | Path, steps: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The recorded samples of ``run_dir`` (of ``steps`` only, when given), by step.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist (names it), or has no recorded samples
            (names the setting to turn on).
        ValueError: none of ``steps`` was recorded (names the recorded steps).
    """
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist or is not a directory: pass the "
                                "run_dir of a training run (trainer.run_dir in its YAML)")
    folder = Path(run_dir) / "samples"
    files = sorted(folder.glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no step_<n>.jsonl: the run recorded no samples; train with "
            "trainer.record_samples > 0 (YAML) or Trainer(record_samples=k) and a run_dir")
    wanted = None if steps is None else set(steps)
    rows = []
    for path in files:
        if wanted is None or int(path.stem.split("_")[1]) in wanted:
            rows.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    if not rows:
        recorded = [int(p.stem.split("_")[1]) for p in files]
        raise ValueError(f"no recorded samples at steps {sorted(wanted or [])}; {folder} has "
                         f"steps {recorded[0]}..{recorded[-1]} ({len(recorded)} files)")
    return rows


def parse_steps(text: str) -> list[int]:
    """``"1,3,5-7"`` -> ``[1, 3, 5, 6, 7]``.

    Raises:
        ValueError: not a comma-separated list of steps and ``a-b`` ranges.

    Example:
        >>> parse_steps("1,3,5-7")
        [1, 3, 5, 6, 7]
    """
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"--steps {text!r}: {part!r} is not a step or a range a-b; "
                             "write e.g. 1,3,5-7")
        lo, hi = int(match[1]), int(match[2] or match[1])
        out.extend(range(lo, hi + 1))
    return out


def logprob_colour(logprob: float) -> str:
    """Heat-map colour of a behaviour log-prob: green at 0 (certain) to red at the floor.

    Example:
        >>> logprob_colour(0.0), logprob_colour(-3.0), logprob_colour(-100.0)
        ('hsl(120,70%,78%)', 'hsl(60,70%,78%)', 'hsl(0,70%,78%)')
    """
    x = min(max(logprob / LOGPROB_FLOOR, 0.0), 1.0)
    return f"hsl({round(120 * (1 - x))},70%,78%)"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _signed(value: float | None) -> str:
    if value is None:
        return "n/a"
    cls = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<span class="{cls}">{value:+.3g}</span>'


def _token(text: str, token_id: int, masked: bool, logprob: float, version: int,
           policy_version: int, advantage: float | None) -> str:
    shown = _esc(text.replace("\n", "\u21b5\n") if text else "\u2205")
    if masked:
        return f'<span class="t m" title="id {token_id} &middot; prompt/tool (not trained)">' \
               f"{shown}</span>"
    stale = policy_version - version
    tip = f"id {token_id} · log-prob {logprob:.3f} · version {version} · staleness {stale}"
    if advantage is not None:
        tip += f" · advantage {advantage:+.3f}"
    sub = f'<sub class="s">{stale}</sub>' if stale else ""
    return (f'<span class="t" style="background:{logprob_colour(logprob)}" '
            f'title="{_esc(tip)}">{shown}</span>{sub}')


def _message(message: Any) -> str:
    if not isinstance(message, dict):
        return f'<div class="msg"><pre>{_esc(message)}</pre></div>'
    content = message.get("content")
    if message.get("tool_calls"):
        content = f"{content or ''} {json.dumps(message['tool_calls'], default=str)}"
    return (f'<div class="msg"><span class="role">{_esc(message.get("role", "?"))}</span>'
            f"<pre>{_esc(content if content is not None else '')}</pre></div>")


def _sample(row: dict[str, Any]) -> str:
    mask, logprobs, versions = row["loss_mask"], row["logprobs"], row["versions"]
    advantages = row.get("advantages") or [None] * len(mask)
    trained = [i for i, m in enumerate(mask) if m]
    stale = [row["policy_version"] - versions[i] for i in trained]
    mean_lp = sum(logprobs[i] for i in trained) / len(trained) if trained else 0.0
    meta = (f"task seed <b>{_esc(row['task_seed'])}</b> · reward <b>{row['reward']:.3g}</b> · "
            f"advantage <b>{_signed(row.get('advantage'))}</b> · policy version "
            f"<b>{row['policy_version']}</b> · {len(mask)} tokens ({len(trained)} trained, mean "
            f"log-prob {mean_lp:.2f}) · staleness max <b>{max(stale, default=0)}</b>")
    tokens = "".join(
        _token(text, tid, not m, lp, v, row["policy_version"], adv)
        for text, tid, m, lp, v, adv in zip(row["tokens"], row["token_ids"], mask, logprobs,
                                            versions, advantages, strict=True))
    turns = "".join(_message(m) for m in row.get("messages") or [])
    return (f'<article class="sample"><div class="meta">{meta}</div>'
            f'<div class="turns">{turns}</div><div class="tokens">{tokens}</div></article>')


def render_html(rows: list[dict[str, Any]], title: str = "trajectories") -> str:
    """The page for ``rows`` (``load_samples`` output): sections per (policy, agent), steps
    in order inside each, the legend and filters on top."""
    groups: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        key = (str(row["policy"]), str(row["agent"]))
        groups.setdefault(key, {}).setdefault(int(row["step"]), []).append(row)
    agents = sorted({a for _, a in groups})
    options = "".join(f'<option value="{_esc(a)}">{_esc(a)}</option>' for a in agents)
    steps = sorted({int(r["step"]) for r in rows})
    span = (f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
            if steps else "no steps")
    sections = []
    for (policy, agent), by_step in sorted(groups.items()):
        body = "".join(
            f'<details class="step" open><summary>step {step} · {len(samples)} sample(s)'
            f'</summary>{"".join(_sample(s) for s in samples)}</details>'
            for step, samples in sorted(by_step.items()))
        sections.append(f'<section class="group" data-agent="{_esc(agent)}"><h2>policy '
                        f"{_esc(policy)} · agent {_esc(agent)}</h2>{body}</section>")
    legend = (f'<div class="legend"><span>behaviour log-prob: 0 <span class="grad"></span> '
              f"≤ {LOGPROB_FLOOR:g}</span><span class=\"t m\">prompt / tool tokens (not "
              'trained)</span><span>token<sub class="s">2</sub> staleness = policy version at '
              "train time − token version</span><span>hover a token for its id and values"
              "</span></div>")
    nav = (f'<div class="nav"><label>agent <select id="agent"><option value="">all</option>'
           f'{options}</select></label><label><input type="checkbox" id="stale" checked> '
           "show staleness</label></div>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}'
            f"</title><style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p>{len(rows)} recorded samples, {span}</p>{legend}{nav}{''.join(sections)}"
            f"<script>{_JS}</script></body></html>")


def write_view(run_dir: str | Path, out: str | Path | None = None,
               steps: Iterable[int] | None = None) -> Path:
    """Write the viewer page of ``run_dir`` (default ``run_dir/view.html``); returns its path.

    Raises:
        FileNotFoundError: the run recorded no samples (see ``load_samples``).
    """
    rows = load_samples(run_dir, steps)
    path = Path(out) if out is not None else Path(run_dir) / "view.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(rows, f"trajectories of {Path(run_dir).resolve().name}"),
                    encoding="utf-8")
    return path
