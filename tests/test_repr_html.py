"""Objects a notebook user inspects render as HTML (``_repr_html_``), with their text escaped."""

from __future__ import annotations

from areal_agents.gateway.sessions import Session, Turn
from areal_agents.samples import Sample, collate


def test_session_html_lists_turns_and_escapes_client_text() -> None:
    session = Session(policy="<pol>", metadata={"task": "t"})
    session.record(Turn(prompt_ids=[1, 2, 3], completion_ids=[4, 5], logprobs=[-0.1, -0.2],
                        versions=[2, 3], messages=[{"role": "user", "content": "hi"}],
                        reply={"role": "assistant", "content": "<script>x</script>"},
                        tools=None, finish_reason="stop", request_id="r1"))
    session.add_reward(0.5)
    page = session._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "policy=&lt;pol&gt;" in page and "reward=0.5" in page
    assert "<tr><td>0</td><td>3</td><td>2</td><td>2..3</td><td>stop</td>" in page


def test_token_batch_html_shows_shapes_counts_and_rewards() -> None:
    batch = collate([Sample([1, 2, 3, 4], [0, 0, 1, 1], [0.0, 0.0, -0.5, -0.7], [-1, -1, 0, 0],
                            reward=1.0),
                     Sample([5, 6, 7], [0, 1, 1], [0.0, -0.1, -0.2], [-1, 0, 0], reward=0.0)])
    page = batch._repr_html_()
    assert "<b>TokenBatch</b> 2 rows, 7 tokens, 4 trained; rewards [1, 0]" in page
    assert "<tr><td>input_ids</td><td>(2, 4)</td><td>int64</td></tr>" in page
    assert "advantages" not in page  # unset optional fields are left out


def test_trainer_html_shows_step_policies_and_last_metrics() -> None:
    import areal_agents as aa

    trainer = aa.Trainer(env="Signaling-v0",
                         policies={"<s>": aa.Policy(model="tiny:xs"),
                                   "l": aa.Policy(model="tiny:xs", frozen=True)},
                         policy_map={"speaker": "<s>", "listener": "l"}, batch_size=4,
                         group_size=2)
    trainer.history.append({"step": 0, "train/<s>/success": 0.25})
    page = trainer._repr_html_()
    assert "<b>Trainer</b> step 0, algorithm GRPO" in page
    assert "<tr><td>speaker</td><td>&lt;s&gt;</td><td>trained</td></tr>" in page
    assert "<tr><td>listener</td><td>l</td><td>frozen</td></tr>" in page
    assert "<tr><td>train/&lt;s&gt;/success</td><td>0.25</td></tr>" in page


def test_proxy_episode_html_names_the_session_and_hides_its_key() -> None:
    from areal_agents.proxy import Episode

    episode = Episode(client=None, session_id="s-<1>", api_key="sk-secret-key",  # type: ignore[arg-type]
                      base_url="http://127.0.0.1:8000", http=None)  # type: ignore[arg-type]
    page = episode._repr_html_()
    assert "session=s-&lt;1&gt;" in page and "gateway=http://127.0.0.1:8000" in page
    assert "sk-secret-key" not in page and "key hidden" in page


def test_sample_html_colours_generated_log_probs_and_escapes_names() -> None:
    sample = Sample([7, 8, 9, 10], [0, 1, 1, 0], [0.0, 0.0, -6.0, 0.0], [-1, 2, 3, -1],
                    reward=1.0, agent="<a>", policy="p", group="g")
    page = sample._repr_html_()
    assert ("<b>Sample</b> agent=&lt;a&gt; policy=p group=g reward=1; 4 tokens, 2 generated, "
            "versions 2..3<table>") in page
    assert "<tr><th>token id</th><td>7</td><td>8</td><td>9</td><td>10</td></tr>" in page
    # masked positions have no log-prob; generated ones the viewer's heat-map colour
    assert ('<tr><th>log-prob</th><td></td><td style="background:hsl(120,70%,78%)">0.00</td>'
            '<td style="background:hsl(0,70%,78%)">-6.00</td><td></td></tr>') in page


def test_sample_html_shows_only_the_last_positions_of_a_long_sample() -> None:
    n = 100
    sample = Sample(list(range(n)), [0] * 90 + [1] * 10, [-0.5] * n, [-1] * 90 + [0] * 10)
    page = sample._repr_html_(max_tokens=4)
    assert "100 tokens, 10 generated, versions 0..0; positions 96..99 shown" in page
    assert "<tr><th>position</th><td>96</td><td>97</td><td>98</td><td>99</td></tr>" in page
