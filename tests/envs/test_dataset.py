"""Dataset-v0 / DatasetMultiTurn-v0: loading (and its errors), seeds -> rows, splits, single- and
multi-turn scoring, the reason in the transcript, YAML configs."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import areal_agents as aa
from areal_agents.config import load_config
from areal_agents.envs._task_seeds import SeedSplit
from areal_agents.envs.dataset import DatasetEnv
from areal_agents.errors import ConfigError
from areal_agents.verifiers import Verdict

DATA = Path(__file__).parents[1] / "data" / "math_tiny.jsonl"
ROWS = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]


def numeric_env(**kwargs) -> DatasetEnv:
    return DatasetEnv(**{"rows": ROWS, "verifier": "numeric", **kwargs})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- loading


def test_shipped_file_has_40_rows_with_questions_and_answers():
    env = DatasetEnv(path=str(DATA))
    assert len(env.prompts) == 40 and len(env.answers) == 40
    assert env.prompts[0].startswith("What is ") and env.answers[0] == "13"


def test_json_and_list_and_jsonl_sources_give_the_same_tasks(tmp_path):
    write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in ROWS])
    (tmp_path / "t.json").write_text(json.dumps(ROWS))
    envs = [numeric_env(), numeric_env(rows=None, path=str(tmp_path / "t.jsonl"))]
    envs.append(numeric_env(rows=None, path=str(tmp_path / "t.json")))
    assert all(e.prompts == envs[0].prompts and e.answers == envs[0].answers for e in envs)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    env = numeric_env(rows=None, path=str(tmp_path / "t.parquet"))
    assert env.prompts == numeric_env().prompts


def test_datasets_source_and_dataset_dict_error():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    assert numeric_env(rows=ds).answers == numeric_env().answers
    with pytest.raises(
        ConfigError, match=r"got a DatasetDict with splits \['test', 'train'\]; pass one split"
    ):
        numeric_env(rows=datasets.DatasetDict({"train": ds, "test": ds}))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "q", "answer": "1"}', "{oops"], r"t.jsonl:2: not valid JSON \(Expecting"),
        (
            ['{"question": "q", "answer": "1"}', "", "[1, 2]"],
            r"t.jsonl:3: expected one JSON object per line, got list",
        ),
        ([], r"t.jsonl: the file is empty; a .jsonl data file needs one JSON object per line"),
        (["", "  "], r"t.jsonl: the file is empty"),
        (
            ['{"question": "q", "answer": "1"}', "", '{"question": "q", "solution": "2"}'],
            r"t.jsonl:3: the answer field 'answer' is missing \(fields: 'question', 'solution'\); fix the row or set answer_field",
        ),
        (
            ['{"prompt": "q", "answer": "1"}'],
            r"t.jsonl:1: no field 'question' for prompt_template '\{question\}' \(fields: 'prompt', 'answer'\)",
        ),
        (['{"question": "q", "answer": null}'], r"t.jsonl:1: the answer field 'answer' is null"),
    ],
)
def test_loading_errors_name_file_line_and_fix(tmp_path, lines, message):
    path = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(ConfigError, match=message):
        DatasetEnv(path=str(path))


def test_source_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"needs exactly one data source: path='tasks\.jsonl'"):
        DatasetEnv()
    with pytest.raises(ConfigError, match="needs exactly one data source"):
        DatasetEnv(path=str(DATA), rows=ROWS)
    with pytest.raises(
        ConfigError, match=r"missing.jsonl: no such data file \(relative paths start"
    ):
        DatasetEnv(path=str(tmp_path / "missing.jsonl"))
    (tmp_path / "t.csv").write_text("question,answer\n")
    with pytest.raises(
        ConfigError, match=r"unknown data file type '.csv'; use .jsonl, .json or .parquet"
    ):
        DatasetEnv(path=str(tmp_path / "t.csv"))
    (tmp_path / "t.json").write_text('{"question": "q"}')
    with pytest.raises(
        ConfigError, match=r"a \.json data file must hold a list of objects, got dict"
    ):
        DatasetEnv(path=str(tmp_path / "t.json"))
    with pytest.raises(
        ConfigError, match=r"rows\[1\]: expected a mapping of field -> value, got str"
    ):
        DatasetEnv(rows=[{"question": "q", "answer": 1}, "row"])
    with pytest.raises(ConfigError, match="rows: no rows; a dataset env needs at least one task"):
        DatasetEnv(rows=[])


def test_a_data_file_is_read_once_per_version(tmp_path, monkeypatch):
    """Trainers build an env per episode: the file is read and checked once, not each time."""
    from areal_agents.envs import _dataset_io

    reads = []
    real = _dataset_io._load_file
    monkeypatch.setattr(_dataset_io, "_load_file", lambda path: reads.append(path) or real(path))
    _dataset_io.file_tasks.cache_clear()
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in ROWS])
    envs = [DatasetEnv(path=str(path), verifier="numeric") for _ in range(3)]
    assert len(reads) == 1 and envs[0].prompts is envs[2].prompts
    write_lines(path, [json.dumps(r) for r in ROWS[:10]])  # a new version of the file
    assert len(DatasetEnv(path=str(path), verifier="numeric").prompts) == 10 and len(reads) == 2
    assert (
        len(DatasetEnv(path=str(path), verifier="numeric", prompt_template="Q: {question}").prompts)
        == 10
    )
    assert len(reads) == 3  # other options: read again


def test_option_errors():
    with pytest.raises(
        ConfigError, match="split must be one of seed, train, eval, all; got 'test'"
    ):
        numeric_env(split="test")
    with pytest.raises(ConfigError, match="max_turns must be >= 1, got 0"):
        numeric_env(max_turns=0)
    with pytest.raises(
        ConfigError, match="the eval split takes 20 of 20 rows, leaving none to train on"
    ):
        numeric_env(eval_size=20)
    with pytest.raises(ConfigError, match="eval_seed_start must be >= 0, got -1"):
        numeric_env(eval_seed_start=-1)
    with pytest.raises(ConfigError, match=r"eval_fraction must be in \[0, 1\), got 1.5"):
        numeric_env(eval_fraction=1.5)
    with pytest.raises(ConfigError, match="no verifier named 'maths'; did you mean 'math'"):
        numeric_env(verifier="maths")
    with pytest.raises(ConfigError, match=r"prompt_template '\{0\}' is not a valid format"):
        numeric_env(prompt_template="{0}")


def test_prompt_template_field_name_system_prompt_and_answer_pattern():
    rows = [{"q": "Tom has 3 apples...", "solution": "3 + 4 = 7\n#### 7"}]
    env = DatasetEnv(
        rows=rows, prompt_template="q", answer_field="solution", answer_pattern=r"####\s*(.+)",
        system_prompt="Put the answer in \\boxed{}.", verifier="numeric", split="all",
    )  # fmt: skip
    obs, info = _run(env.reset(seed=0))
    assert obs == [aa.system("Put the answer in \\boxed{}."), aa.user("Tom has 3 apples...")]
    assert info == {"row": 0, "answer": "7"}
    formatted = numeric_env(prompt_template="Q: {question} (answer {answer})", split="all")
    assert formatted.prompts[3] == "Q: What is 3 + 1? (answer 4)"
    with pytest.raises(
        ConfigError, match=r"rows\[0\]: answer_pattern 'nope' not found in 'solution'"
    ):
        DatasetEnv(rows=rows, prompt_template="q", answer_field="solution", answer_pattern="nope")


def _run(coro):
    import asyncio

    return asyncio.run(coro)


# ---------------------------------------------------------------- seeds and splits


async def _rows_of(env: DatasetEnv, seeds) -> list[int]:
    return [(await env.reset(seed=s))[1]["row"] for s in seeds]


async def test_seed_to_row_is_deterministic_and_shuffled():
    env = numeric_env(eval_size=4)
    first = await _rows_of(env, range(16))
    assert first == await _rows_of(numeric_env(eval_size=4), range(16))  # a new instance
    assert sorted(first) == sorted(env.seeds.train_rows)  # one epoch: every train row once
    steps = [b - a for a, b in itertools.pairwise(first)]
    assert steps.count(1) < 4  # consecutive seeds are not consecutive rows
    second_epoch = await _rows_of(env, range(16, 32))
    assert sorted(second_epoch) == sorted(first) and second_epoch != first  # reshuffled
    other = await _rows_of(numeric_env(eval_size=4, shuffle_seed=1), range(16))
    assert other != first


async def test_eval_seeds_never_reach_train_rows():
    env = numeric_env(eval_fraction=0.2)  # 4 of 20 rows held out
    train = set(await _rows_of(env, range(200)))
    evals = set(await _rows_of(env, range(1_000_000, 1_000_050)))
    assert len(train) == 16 and len(evals) == 4 and not train & evals
    assert evals == set(env.seeds.eval_rows)
    # eval seed start + i is the i-th eval row, so range(start, start + 4) is the whole split
    assert await _rows_of(env, range(1_000_000, 1_000_004)) == env.seeds.eval_rows
    explicit_train = set(
        await _rows_of(numeric_env(eval_fraction=0.2, split="train"), range(2_000_000, 2_000_100))
    )
    explicit_eval = set(await _rows_of(numeric_env(eval_fraction=0.2, split="eval"), range(100)))
    assert explicit_train == train and explicit_eval == evals
    assert set(await _rows_of(numeric_env(split="all"), range(20))) == set(range(20))


@settings(max_examples=60, deadline=None)
@given(num_rows=st.integers(2, 60), data=st.data())
def test_seed_split_properties(num_rows, data):
    """For any sizes: eval and train rows partition the rows, an epoch of training seeds is a
    permutation of the train rows, and eval seeds only reach eval rows."""
    num_eval = data.draw(st.integers(0, num_rows - 1))
    split = SeedSplit(num_rows, num_eval, shuffle_seed=data.draw(st.integers(0, 5)))
    train, evals = split.train_rows, split.eval_rows
    assert sorted(train + evals) == list(range(num_rows))
    epoch = data.draw(st.integers(0, 3)) * len(train)
    assert sorted(split.row(s, "train") for s in range(epoch, epoch + len(train))) == train
    assert sorted(split.row(s, "seed") for s in range(epoch, epoch + len(train))) == train
    if num_eval:
        start = split.eval_seed_start
        assert [split.row(start + i, "seed") for i in range(num_eval)] == evals
        assert {split.row(s, "eval") for s in range(3 * num_eval)} == set(evals)


async def test_eval_seed_with_an_empty_eval_split_is_an_error():
    env = numeric_env(eval_fraction=0.0)
    with pytest.raises(ConfigError, match="an eval seed was asked for but the eval split is empty"):
        await env.reset(seed=1_000_000)


async def test_unseeded_reset_draws_a_train_row():
    env = numeric_env(eval_size=5)
    rows = {(await env.reset())[1]["row"] for _ in range(30)}
    assert rows <= set(env.seeds.train_rows)


# ---------------------------------------------------------------- scoring and transcripts


async def test_single_turn_scores_and_the_reason_reaches_the_transcript():
    env = aa.make("Dataset-v0", path=str(DATA), verifier="math")
    obs, info = await env.reset(seed=3)
    question, answer = obs[-1]["content"], info["answer"]
    episode = await aa.run_episode(env, aa.ScriptedAgent(lambda o: f"\\boxed{{{answer}}}"), seed=3)
    assert episode.returns == {"agent": 1.0}
    assert episode.messages["agent"][0]["content"] == question
    assert (
        episode.messages["agent"][-1]["content"]
        == f"Correct: expected {answer}, got {answer}: equal."
    )
    await env.reset(seed=3)
    reply, reward, done, truncated, info = await env.step("I do not know")
    assert (reward, done, truncated, info["success"]) == (0.0, True, False, False)
    assert info["verdict_reason"] == "no math answer found in the response 'I do not know'"
    assert reply == [
        aa.user(f"Not correct: {info['verdict_reason']}. The expected answer was {answer}.")
    ]


async def test_multi_turn_feedback_then_success():
    env = aa.make("DatasetMultiTurn-v0", rows=ROWS, verifier="numeric", eval_size=2)
    _, info = await env.reset(seed=0)
    answer = info["answer"]
    reply, reward, done, _, info = await env.step("maybe 1000")
    assert (reward, done, info["success"], info["turn"]) == (0.0, False, False, 1)
    assert reply == [
        aa.user(
            "Not correct: got 1000: not equal to the expected answer. Try again (2 tries left)."
        )
    ]
    assert answer not in reply[0]["content"]  # feedback never gives the answer away
    reply, reward, done, _, info = await env.step(f"then {answer}")
    assert (reward, done, info["success"], info["turn"]) == (1.0, True, True, 2)


async def test_multi_turn_ends_after_max_turns_with_the_last_score():
    env = numeric_env(max_turns=2, eval_size=2)
    _, info = await env.reset(seed=0)
    assert (await env.step("1000"))[1:3] == (0.0, False)
    _, reward, done, _, info = await env.step("")
    assert (reward, done, info["success"], info["turn"]) == (0.0, True, False, 2)
    assert info["verdict_reason"] == "empty response: no number to compare"
    with pytest.raises(aa.ResetNeeded):
        await env.step("1")


async def test_retry_penalty():
    env = numeric_env(max_turns=3, retry_penalty=0.25, eval_size=2)
    _, info = await env.reset(seed=0)
    await env.step("1000")
    assert (await env.step(info["answer"]))[1] == 0.75


async def test_tool_call_actions_score_as_empty():
    env = numeric_env(eval_size=2)
    await env.reset(seed=0)
    action = {"role": "assistant", "content": None, "tool_calls": [aa.tool_call("f", {})]}
    info = (await env.step(action))[4]
    assert info["verdict_reason"] == "empty response: no number to compare"


async def test_verifier_objects_kwargs_and_async_verifiers():
    class Judge:
        async def averify(self, response, answer):
            return Verdict(0.5, f"half marks for {response!r}")

        def verify(self, response, answer):
            raise AssertionError("the env awaits averify")

    env = numeric_env(verifier=Judge(), eval_size=2)
    await env.reset(seed=0)
    reward, _, _, info = (await env.step("x"))[1:]
    assert (reward, info["success"], info["verdict_reason"]) == (0.5, False, "half marks for 'x'")
    tolerant = numeric_env(verifier_kwargs={"abs_tol": 0.5}, eval_size=2)
    _, info = await tolerant.reset(seed=0)
    assert (await tolerant.step(str(int(info["answer"]) + 0.4)))[1] == 1.0


async def test_unusable_reference_answer_names_the_row(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"question": "q", "answer": "twelve"}'] * 3)
    env = DatasetEnv(path=str(path), verifier="numeric", split="all")
    await env.reset(seed=0)
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{path}:") + r"\d: the reference answer 'twelve' is not one number",
    ):
        await env.step("12")


async def test_sample_action_leaves_the_episode_alone():
    env = numeric_env(eval_size=2)
    obs, _ = await env.reset(seed=5)
    env.sample_action(), env.sample_action()
    assert (await env.reset(seed=5))[0] == obs
    assert re.fullmatch(r"The answer is \d+\.", env.sample_action())


# ---------------------------------------------------------------- from a YAML config


def test_train_config_yaml_builds_the_env(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "env: Dataset-v0\n"
        f"env_kwargs: {{path: {DATA}, verifier: math, system_prompt: 'Answer in \\boxed{{}}.'}}\n"
        "policies: {solver: {model: 'tiny:xs'}}\n"
        "policy_map: {agent: solver}\n"
    )
    cfg = load_config(config)
    assert cfg.env == "Dataset-v0" and cfg.env_kwargs["verifier"] == "math"
    env = aa.make(cfg.env, **cfg.env_kwargs)
    obs, _ = _run(env.reset(seed=0))
    assert obs[0] == aa.system("Answer in \\boxed{}.") and obs[1]["content"].startswith("What is")
    assert env.spec.kwargs["path"] == str(DATA)


# ---------------------------------------------------------------- docs/datasets_and_verifiers.md

DOC = Path(__file__).parents[2] / "docs" / "datasets_and_verifiers.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_doc_bring_your_own_data_example_runs_and_prints_what_the_doc_says(
    tmp_path, monkeypatch, capsys
):
    code, printed = _blocks("python")[0], _blocks("text")[0]
    assert 15 <= len(code.strip().splitlines()) <= 25  # the "~20-line" example
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
    assert capsys.readouterr().out == printed


def test_doc_yaml_config_loads_and_builds_the_env(tmp_path, monkeypatch):
    monkeypatch.chdir(DOC.parents[1])  # the config's data path is relative to the repo root
    (tmp_path / "run.yaml").write_text(_blocks("yaml")[0])
    cfg = load_config(tmp_path / "run.yaml")
    env = aa.make(cfg.env, **cfg.env_kwargs)
    eval_rows = [_run(env.reset(seed=s))[1]["row"] for s in cfg.trainer.eval_seeds]
    assert sorted(eval_rows) == sorted(env.seeds.eval_rows) and len(eval_rows) == 8


def test_doc_verifier_snippet_shows_the_real_verdict():
    code = _blocks("python")[1]
    call, shown = re.search(r"\n(verifiers\.get\(.*\))\n# (Verdict\(.*\))\n", code).groups()
    namespace: dict = {}
    exec(code.split("\n\n")[0], namespace)
    assert repr(eval(call, namespace)) == shown
