"""Write the example notebooks from the cell sources below (``python make_notebooks.py``).

The notebooks are committed unexecuted; ``tests/test_notebooks.py`` runs each top to bottom.
Edit the cells here and regenerate, so the ``.ipynb`` files never drift from reviewed code.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


class Md(str):
    """A Markdown cell's source (plain strings are code cells)."""

CUSTOM_ENV = [
    Md("# Write and check a custom env\n\nAn env is async and Gymnasium-shaped: observations are "
    "new chat messages, actions are assistant messages (or strings). `aa.check_env` runs the "
    "env contract (seeding, types, misuse errors, cancellation, pickling) and renders its "
    "report as a table."),
    '''import areal_agents as aa


class Echo(aa.AgentEnv):
    """Repeat a random word back (one step)."""

    WORDS = ("apple", "river", "stone")

    async def reset(self, *, seed=None, options=None):
        await super().reset(seed=seed)
        self.word = self.WORDS[int(self.np_random.integers(len(self.WORDS)))]
        return [aa.user(f"Say '{self.word}'.")], {"word": self.word}

    async def step(self, action):
        text = aa.parse_action(action)["content"] or ""
        correct = text.strip() == self.word
        return [aa.user("Correct." if correct else "Wrong.")], float(correct), True, False, {}

    def sample_action(self, agent=None) -> str:
        return "apple"''',
    '''report = await aa.check_env(Echo())
assert report.ok, report
report''',
    Md("Play one episode by hand: the observation names the word, the reward says if we said it."),
    '''env = Echo()
obs, info = await env.reset(seed=3)
_, reward, terminated, truncated, _ = await env.step(info["word"])
print(obs[0]["content"], "->", reward, terminated)
assert reward == 1.0 and terminated''',
    Md("`aa.run_episode` plays it with an agent and returns an `Episode`, shown as a table."),
    '''await aa.run_episode(Echo(), aa.ScriptedAgent(lambda observation: "apple"), seed=3)''',
]

SIGNALING = [
    Md("# Train two LLMs on Signaling and plot\n\nA speaker (sees the target item, sends one "
    "symbol) and a listener (sees the symbol, picks the item) are two separately "
    "parameterised tiny LLMs trained by GRPO. This runs a few steps only (the full run is "
    "`areal-agents train examples/signaling/two_llms.yaml`)."),
    '''import tempfile

import areal_agents as aa

run_dir = tempfile.mkdtemp(prefix="signaling_nb_")
trainer = aa.Trainer(
    env="Signaling-v0", env_kwargs={"num_items": 4, "vocab_size": 10},
    policies={"speaker": aa.Policy(model="tiny:xs", seed=0, lr=1e-3),
              "listener": aa.Policy(model="tiny:xs", seed=1, lr=1e-3)},
    policy_map={"speaker": "speaker", "listener": "listener"},
    algorithm=aa.GRPO(clip_eps=0.2, kl_coef=0.05),
    batch_size=8, group_size=4, max_staleness=0, run_dir=run_dir)
try:
    history = await trainer.afit(3)
finally:
    await trainer.aclose()
[round(row["train/speaker/success"], 3) for row in history]''',
    Md("The trainer renders as a table (step, each agent's policy, the last metrics)."),
    '''trainer''',
    Md("The run recorded a few trained samples per policy and step (`record_samples`, what "
       "`areal-agents view RUN_DIR` draws as an HTML page): rebuild them as `Sample`s and "
       "collate them into the `TokenBatch` a train step sees."),
    '''from areal_agents.samples import Sample, collate
from areal_agents.viewer import load_samples

rows = load_samples(run_dir, steps=[3])
samples = [Sample(r["token_ids"], r["loss_mask"], r["logprobs"], r["versions"],
                  reward=r["reward"], agent=r["agent"], policy=r["policy"]) for r in rows]
display(collate(samples))  # shapes, token counts, rewards
samples[0]                 # one sequence: token ids, loss mask, behaviour log-probs, versions''',
    '''from areal_agents.plot import plot_figure, read_metrics

rows = read_metrics(run_dir)
assert len(rows) >= 3
figure = plot_figure(rows, title="Signaling, two tiny LLMs")''',
]

DISTRIBUTED = [
    Md("# Distributed debugging in Jupyter\n\nStart a 2-process gloo worker group from a cell. "
    "The engine class and the functions below are defined **in this notebook**: the launcher "
    "serialises them by value (cloudpickle). Step the group, look at each rank's tensors, "
    "stop it with `close()`. If the kernel is restarted instead, the ranks notice their "
    "parent is gone and exit (no orphans)."),
    '''import torch
import torch.distributed as dist

from areal_agents.trainers.launcher import DistributedEngineGroup


class TinyDataParallel:
    """A linear model per rank; ``step`` averages gradients over ranks (data parallel)."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)                       # same initial weights on every rank
        self.model = torch.nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def step(self, x, y):
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        for p in self.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        self.opt.step()
        return {"rank": dist.get_rank(), "loss": loss.item()}

    def weights(self):
        return self.model.weight.detach().clone()

    def run(self, fn):
        """Call ``fn(model, rank)`` here, on the rank: a probe written in the notebook."""
        return fn(self.model, dist.get_rank())


group = DistributedEngineGroup(2, TinyDataParallel, 0, device="cpu", start_timeout=300)
group.num_processes''',
    Md("Each rank gets its own rows (`call_each`); the averaged gradients keep the weights equal."),
    '''torch.manual_seed(1)
x, y = torch.randn(8, 4), torch.randn(8, 1)
shards = [((x[:4], y[:4]), {}), ((x[4:], y[4:]), {})]
for _ in range(3):
    stats = group.call_each("step", shards)
stats''',
    '''per_rank = group.call("weights")                   # one tensor per rank
print(per_rank)
assert torch.equal(per_rank[0], per_rank[1])''',
    Md("A function defined here is sent as an argument too: a probe run on every rank."),
    '''def probe(model, rank):
    return rank, round(float(model.weight.norm()), 6)


norms = group.call("run", probe)
assert norms[0][1] == norms[1][1]
norms''',
    '''group.close()
group.close()                                       # idempotent
assert all(not p.is_alive() for p in group._procs)''',
]

PROXY = [
    Md("# Proxy mode with an agent in the notebook\n\n`areal-agents serve --train` serves a "
       "policy behind the OpenAI-compatible gateway and trains it on the sessions external "
       "agents open, reward and end (docs/proxy_mode.md). Here the server runs as a child "
       "process for 2 GRPO steps and the agent is a function in this notebook."),
    '''import json
import subprocess
import sys
import tempfile
import time

import httpx2

from areal_agents.proxy import SessionRefused, episode
from areal_agents.trainers.launcher import free_port

port, admin_key = free_port(), "notebook-secret"
url = f"http://127.0.0.1:{port}"
server = subprocess.Popen(
    [sys.executable, "-m", "areal_agents.cli", "serve", "--train", "../proxy/train.yaml",
     "trainer.steps=2", f"run_dir={tempfile.mkdtemp(prefix='proxy_nb_')}",
     "--port", str(port), "--admin-key", admin_key],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
for _ in range(600):
    try:
        if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
            break
    except httpx2.HTTPError:
        time.sleep(0.5)
httpx2.get(f"{url}/health").json()''',
    Md("The agent: ask one addition, score the reply here (client side), post the reward. "
       "Four sessions of one task id form a GRPO group."),
    '''import asyncio


async def play(task: int) -> list[float]:
    a, b = task % 10, (3 * task) % 10

    async def one() -> float:
        async with episode(url, "solver", task_id=f"q{task}", key=admin_key) as ep:
            reply = await ep.client.chat.completions.create(
                model="solver", messages=[{"role": "user", "content": f"{a} + {b} ="}],
                max_tokens=4, temperature=1.0)
            reward = float((reply.choices[0].message.content or "").strip() == str(a + b))
            await ep.reward(reward)
            return reward

    return await asyncio.gather(*(one() for _ in range(4)))


rewards, task = [], 0
while server.poll() is None and task < 32:  # the server exits after trainer.steps steps
    try:
        rewards += await play(task)
    except (httpx2.TransportError, SessionRefused):
        break  # the server finished while this group was open
    task += 1
len(rewards)''',
    '''server.wait(timeout=600)
summary = json.loads(server.stdout.read().strip().splitlines()[-1])
assert summary["steps"] == 2, summary
summary''',
]

GENERATIVE_REWARD = [
    Md("# A generative-reward run\n\nA frozen LLM judge scores the solver's answers "
       "(`aa.rewards.RubricJudge`, docs/generative_reward.md). Both are untrained tiny models "
       "here, so the judge mostly fails to give a score: with `on_failure=\"fallback\"` such "
       "replies get the fallback reward and are **counted**, never hidden. Swap in real models "
       "(`examples/genrm/`) for a judge worth training against."),
    '''import areal_agents as aa
from areal_agents.rewards import RubricJudge

judge = RubricJudge("Is the answer correct?", policy="judge", scale=(0, 10),
                    on_failure="fallback", fallback=0.0)
trainer = aa.Trainer(
    env="Arithmetic-v0", env_kwargs={"digits": 1, "operations": "+"},
    policies={"solver": aa.Policy(model="tiny:xs", seed=0, lr=1e-3),
              "judge": aa.Policy(model="tiny:xs", seed=1, frozen=True)},
    policy_map={"agent": "solver"}, reward_fns=[judge],
    batch_size=4, group_size=2, max_staleness=0)
try:
    history = await trainer.afit(2)
finally:
    await trainer.aclose()
sorted(k for k in history[-1] if "judge" in k)''',
    '''judge_metrics = {k: v for k, v in history[-1].items() if "judge" in k}
assert judge_metrics, history[-1].keys()
judge_metrics''',
]


NOTEBOOKS = {
    "custom_env.ipynb": CUSTOM_ENV,
    "signaling_two_llms.ipynb": SIGNALING,
    "distributed_debugging.ipynb": DISTRIBUTED,
    "proxy_mode.ipynb": PROXY,
    "generative_reward.ipynb": GENERATIVE_REWARD,
}


def build(cells: list[str]) -> nbformat.NotebookNode:
    """A notebook of ``cells`` (``Md`` ones Markdown, the rest code) for the python3 kernel."""
    nb = new_notebook(cells=[new_markdown_cell(c) if isinstance(c, Md) else new_code_cell(c)
                             for c in cells])
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: regenerating leaves unchanged notebooks unchanged
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)
