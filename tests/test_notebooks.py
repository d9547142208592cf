"""Every notebook in ``examples/notebooks`` runs top to bottom (nbclient, CPU, tiny models),
the committed ``.ipynb`` files equal what ``make_notebooks.py`` writes, and a killed kernel
leaves no worker rank of the distributed-debugging notebook behind.

The notebooks share one kernel (started from the notebooks' folder, as a user would): each
starts with ``%reset -f``, so it sees only the modules already imported (which saves a kernel
start and a torch import per notebook); the distributed-debugging notebook then also shows that
a worker group starts after ``%reset``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"


def _maker() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_match_their_sources() -> None:
    maker = _maker()
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(maker.NOTEBOOKS)
    for name, cells in maker.NOTEBOOKS.items():
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [c.source for c in committed.cells] == list(cells), f"regenerate {name}"


def test_a_group_starts_after_ipython_reset_deleted_main_spec(monkeypatch) -> None:
    """``%reset -f`` in a notebook deletes ``__main__.__spec__``; spawn's start-up data (what
    ``DistributedEngineGroup`` and ``launch`` send a worker) must still be built."""
    import multiprocessing.spawn
    import sys

    from areal_agents.trainers.launcher import _spawn_context

    monkeypatch.delattr(sys.modules["__main__"], "__spec__")
    _spawn_context()
    assert multiprocessing.spawn.get_preparation_data("worker")["name"] == "worker"


@pytest.fixture(scope="module")
def kernel() -> Iterator[nbclient.NotebookClient]:
    """One python3 kernel for the module, run from the notebooks' folder (they write only to
    temporary directories), with one torch thread (the kernel inherits the environment)."""
    client = nbclient.NotebookClient(nbformat.v4.new_notebook(), timeout=900,
                                     kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        with client.setup_kernel():
            yield client


def _run(client: nbclient.NotebookClient, nb: nbformat.NotebookNode) -> None:
    """Execute ``nb``'s cells in order in a cleared namespace; raise on the first error."""
    client.reset_execution_trackers()
    client.nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%reset -f")])
    client.execute_cell(client.nb.cells[0], 0, store_history=False)  # it writes nb.cells[0]
    client.nb = nb
    for index, cell in enumerate(nb.cells):
        client.execute_cell(cell, index)  # raises CellExecutionError naming the failing cell


def _html(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_top_to_bottom(name: str, kernel: nbclient.NotebookClient) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    _run(kernel, nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # the objects a user inspects render as HTML
    if name == "custom_env.ipynb":
        assert "<table>" in _html(code[-1]) and "terminated" in _html(code[-1])  # an Episode
    if name == "signaling_two_llms.ipynb":
        assert "<b>Trainer</b> step 3, algorithm GRPO" in _html(code[1])
        assert "<b>TokenBatch</b> 4 rows" in _html(code[2])  # 2 per policy
        assert "<b>Sample</b> agent=" in _html(code[2])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited already
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_a_dead_kernel_leaves_no_worker_rank_behind(kernel: nbclient.NotebookClient,
                                                    tmp_path: Path) -> None:
    """The distributed-debugging notebook's group, busy in a call when its kernel is killed
    alone (the OOM killer; Jupyter then restarts the kernel): the ranks, which never read
    their closed pipes while busy, notice their parent is gone and exit
    (``trainers/launcher.py``: ``_watch_parent``). "Restart kernel" kills the kernel's whole
    process group, workers included, so that case needs no watcher."""
    nb = nbformat.read(NOTEBOOKS / "distributed_debugging.ipynb", as_version=4)
    start = next(c for c in nb.cells if "DistributedEngineGroup(2" in c.source)
    probe = nbformat.v4.new_code_cell("print(*(p.pid for p in group._procs))")
    _run(kernel, nbformat.v4.new_notebook(cells=[start, probe]))
    pids = [int(p) for o in probe.outputs if o.output_type == "stream" for p in o.text.split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids), probe.outputs
    kernel.kc.execute(  # not awaited: the kernel stays busy in this call until it is killed
        "import time\n\n"
        "def busy(model, rank):\n"
        f"    open(f'{tmp_path}/busy{{rank}}', 'w').close()\n"
        "    time.sleep(600)\n\n"
        "group.call('run', busy)")
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("busy*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(tmp_path.glob("busy*"))) == 2, "the ranks never started the busy call"
    os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)  # the kernel alone
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "worker ranks outlived their kernel"
