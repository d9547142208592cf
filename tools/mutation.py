"""Mutation testing of the core modules with mutmut, one module group at a time.

Usage::

    python tools/mutation.py                      # every module group
    python tools/mutation.py --module router      # one group (repeatable)
    python tools/mutation.py --list               # the groups, their files and tests
    python tools/mutation.py --module rollout --survivors   # re-run only the last survivors

Each group's files are mutated and only that group's fast test files run against each mutant,
so a group takes minutes. The script prints a table of killed / survived / timeout / other and
the kill rate per group, then lists every survivor (``--diffs`` adds each survivor's diff).

Why a staging directory: the package maps ``envs/``, ``agents/`` and ``trainers/`` into
``areal_agents.*`` through ``[tool.setuptools.package-dir]``. mutmut 3 copies the sources into
``mutants/`` and names each mutant after its file path, so ``trainers/logprobs.py`` would be
``trainers.logprobs`` while the tests import ``areal_agents.trainers.logprobs`` (through the
editable install, i.e. the unmutated file): every mutant there would be reported as having no
tests. So the script lays the package out conventionally in ``build/mutation/<group>/``
(``areal_agents/trainers/...``, from the package-dir table), copies ``tests/`` and a
pyproject whose ``[tool.mutmut]`` section names the group's files and tests, and runs mutmut
there. The repository itself is never modified. Shared mutmut settings (timeouts, isolation)
come from ``[tool.mutmut]`` in pyproject.toml.

``--survivors`` re-runs only the mutants the group's last run did not kill (with the current
tests) and merges the result into that run's statuses; it refuses when a mutated source file
differs from its staged copy of that run (mutant names would no longer match). Each run also writes ``run.json`` (date,
seconds, load average, mutants checked) next to ``statuses.json``.

Kill rate = (killed + timeout) / (all mutants checked); a mutant with no covering test, a
suspicious or a segfaulting one counts as not killed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Group:
    """A set of source files mutated together and the test files run against each mutant.

    Attributes:
        files: source files, or folders (every ``.py`` file in them), as repository paths.
        tests: test files (or node ids), as paths in the repository.
        settings: ``[tool.mutmut]`` settings for this group only, over the shared ones
            (e.g. shorter timeouts where mutants stall).
    """

    files: tuple[str, ...]
    tests: tuple[str, ...]
    settings: tuple[tuple[str, object], ...] = ()


GROUPS: dict[str, Group] = {
    "router": Group(("areal_agents/gateway/router.py",),
                    ("tests/gateway/test_router.py", "tests/gateway/test_router_picks.py",
                     "tests/mutation/test_router.py")),
    "params": Group(("areal_agents/gateway/params.py",),
                    ("tests/gateway/test_params_bounds.py", "tests/mutation/test_params.py",
                     "tests/mutation/test_params_stream.py")),
    "tokenization": Group(("areal_agents/gateway/tokenization.py",),
                          ("tests/gateway/test_tokenization.py",
                           "tests/gateway/test_tokenization_mutants.py",
                           "tests/mutation/test_tokenization.py")),
    "sampling": Group(("areal_agents/engines/sampling.py",),
                      ("tests/mutation/test_sampling.py",)),
    "algorithms": Group(("areal_agents/algorithms/",),
                        ("tests/algorithms", "tests/mutation/test_algorithms.py",
                         "tests/mutation/test_algorithms_objects.py",
                         "tests/mutation/test_algorithms_functions.py",
                         "tests/mutation/test_algorithms_gaps.py")),
    "rollout": Group(("areal_agents/rollout/",),
                     ("tests/trainer/test_staleness.py", "tests/trainer/test_controller.py",
                      "tests/trainer/test_ledger_resume.py", "tests/mutation/test_rollout.py",
                      "tests/mutation/test_rollout_state.py",
                      "tests/mutation/test_rollout_controller.py"),
                     # A mutant that stalls the controller (a wait that never ends) uses no CPU,
                     # so only mutmut's wall-clock limit, (estimated test time + constant) *
                     # multiplier, ends it: 2 s + 2x instead of the shared 5 s + 5x.
                     settings=(("timeout_multiplier", 2.0), ("timeout_constant", 2.0))),
    "checkpointing": Group(("trainers/checkpointing.py",),
                           ("tests/trainer/test_checkpoint_atomic.py",
                            "tests/mutation/test_checkpointing.py")),
    "logprobs": Group(("trainers/logprobs.py",),
                      ("tests/fsdp/test_logprobs.py", "tests/mutation/test_logprobs.py")),
    "weight_transports": Group(("trainers/weight_transport.py", "trainers/weight_shm.py"),
                               ("tests/trainer/test_weight_transport.py",
                                "tests/trainer/test_trainer_push_stream.py",
                                "tests/mutation/test_weight_transports.py",
                                "tests/mutation/test_weight_transports_gaps.py"),
                               # a mutant that breaks the shared-memory handshake makes both
                               # sides wait (polling): only the wall-clock limit ends it
                               settings=(("timeout_multiplier", 2.0),
                                         ("timeout_constant", 5.0))),
}

KILLED = ("killed", "timeout")
STATUSES = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped",
            "not checked", "caught by type check")


def package_dirs() -> dict[str, str]:
    """``[tool.setuptools.package-dir]``: import name -> folder in the repository."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["setuptools"]["package-dir"]


def staged_path(repo_path: str, dirs: dict[str, str]) -> str:
    """Where ``repo_path`` lies in the conventional layout (``trainers/x.py`` ->
    ``areal_agents/trainers/x.py``); tests and unmapped paths stay where they are."""
    best = max((d for d in dirs.values() if repo_path.startswith(d.rstrip("/") + "/")),
               key=len, default=None)
    if best is None:
        return repo_path
    package = next(p for p, d in dirs.items() if d == best)
    return package.replace(".", "/") + repo_path[len(best):]


def _toml_value(value: object) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists of them are valid TOML


def stage_pyproject(group: Group, dirs: dict[str, str]) -> str:
    """The repository's pyproject.toml with ``[tool.mutmut]`` naming ``group``'s files and
    tests (the repository's own ``[tool.mutmut]`` settings are kept)."""
    text = (ROOT / "pyproject.toml").read_text()
    shared = tomllib.loads(text).get("tool", {}).get("mutmut", {})
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    settings = {**shared, **dict(group.settings),
                "source_paths": ["areal_agents"],
                "only_mutate": [staged_path(f, dirs) + ("*" if f.endswith("/") else "")
                                for f in group.files],
                "pytest_add_cli_args_test_selection": list(group.tests)}
    lines = ["", "[tool.mutmut]"] + [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def stage(name: str, group: Group, workdir: Path) -> Path:
    """Lay out the package conventionally with the tests in ``workdir/name`` (made afresh)."""
    dirs = package_dirs()
    missing = [p for p in (*group.files, *group.tests) if not (ROOT / p.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"group {name!r} names files that do not exist: {missing}; "
                         "update GROUPS in tools/mutation.py")
    target = workdir / name
    shutil.rmtree(target, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(ROOT / folder, target / package.replace(".", "/"), ignore=ignore,
                        dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", target / "tests", ignore=ignore)
    (target / "pyproject.toml").write_text(stage_pyproject(group, dirs))
    return target


def source_files(group: Group) -> list[str]:
    """The group's source files as repository paths (folders expanded)."""
    out: list[str] = []
    for entry in group.files:
        path = ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        out += [str(f.relative_to(ROOT)) for f in files]
    return out


def changed_since_staged(group: Group, target: Path) -> list[str]:
    """Source files that differ from their copies in the staged run at ``target``."""
    dirs = package_dirs()
    return [f for f in source_files(group)
            if not (target / staged_path(f, dirs)).exists()
            or (target / staged_path(f, dirs)).read_bytes() != (ROOT / f).read_bytes()]


def run_group(name: str, group: Group, workdir: Path, max_children: int,
              survivors_only: bool = False) -> dict[str, str]:
    """Run mutmut for one group; returns mutant name -> status.

    With ``survivors_only``, only the mutants not killed in the last saved run are tested again
    and the result is merged into that run's statuses.
    """
    previous: dict[str, str] = {}
    names: list[str] = []
    if survivors_only:
        saved = workdir / name / "statuses.json"
        if not saved.exists():
            raise SystemExit(f"no saved run for {name!r} in {saved.parent}; run it without "
                             "--survivors first")
        changed = changed_since_staged(group, workdir / name)
        if changed:
            raise SystemExit(f"{changed} changed since the saved run of {name!r}: mutant names "
                             "may no longer match; run the group in full")
        previous = json.loads(saved.read_text())
        names = sorted(m for m, status in previous.items() if status not in KILLED)
        if not names:
            return previous
    target = stage(name, group, workdir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    log = target / "mutmut.log"
    started, load = time.time(), os.getloadavg()[0]
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                               str(max_children), *names], cwd=target, env=env, stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.time() - started
    results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                             cwd=target, env=env, capture_output=True, text=True, check=False)
    statuses = dict(re.findall(r"^\s+(\S+): (.+)$", results.stdout, flags=re.M))
    if proc.returncode != 0 or not statuses:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"mutmut failed for group {name!r} (exit {proc.returncode}); the "
                         f"log is {log}:\n{tail}")
    if survivors_only:
        statuses = {**previous, **{m: statuses.get(m, "not checked") for m in names}}
    (target / "statuses.json").write_text(json.dumps(statuses, indent=1, sort_keys=True))
    (target / "run.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "seconds": round(seconds), "load_average": round(max(load, os.getloadavg()[0]), 1),
        "checked": len(names) if survivors_only else len(statuses),
        "survivors_only": survivors_only}, indent=1))
    return statuses


def kill_rate(counts: Counter[str]) -> float:
    total = sum(counts.values())
    return sum(counts[s] for s in KILLED) / total if total else float("nan")


def table(results: dict[str, dict[str, str]]) -> str:
    """A markdown table: per group, mutants, killed, survived, timeout, other, kill rate."""
    rows = ["| module | mutants | killed | survived | timeout | other | kill rate |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    overall: Counter[str] = Counter()
    for name, statuses in results.items():
        counts = Counter(statuses.values())
        overall += counts
        other = sum(counts.values()) - counts["killed"] - counts["survived"] - counts["timeout"]
        rows.append(f"| {name} | {sum(counts.values())} | {counts['killed']} | "
                    f"{counts['survived']} | {counts['timeout']} | {other} | "
                    f"{kill_rate(counts):.1%} |")
    if len(results) > 1:
        other = (sum(overall.values()) - overall["killed"] - overall["survived"]
                 - overall["timeout"])
        rows.append(f"| **all** | {sum(overall.values())} | {overall['killed']} | "
                    f"{overall['survived']} | {overall['timeout']} | {other} | "
                    f"{kill_rate(overall):.1%} |")
    return "\n".join(rows)


def survivors(results: dict[str, dict[str, str]]) -> list[tuple[str, str, str]]:
    """``(group, mutant, status)`` for every mutant not killed."""
    return [(g, m, s) for g, statuses in results.items() for m, s in sorted(statuses.items())
            if s not in KILLED]


def show(group: str, mutant: str, workdir: Path) -> str:
    """The diff of one mutant (``mutmut show``)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=workdir / group,
                         capture_output=True, text=True, check=False)
    return out.stdout.strip()


_LINES_SCRIPT = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
for name in json.load(sys.stdin):
    diff = get_diff_for_mutant(name, path=name.rsplit(".", 1)[0].replace(".", "/") + ".py")
    lines = diff.splitlines()[2:]
    old = [x[1:].strip() for x in lines if x.startswith("-")]
    new = [x[1:].strip() for x in lines if x.startswith("+")]
    print(json.dumps([name, " / ".join(old), " / ".join(new)]))
"""


def function_of(mutant: str) -> tuple[str, str]:
    """``(file name, function)`` of a mutant name, e.g. ``("controller.py",
    "RolloutController.take")`` for ``...controller.xǁRolloutControllerǁtake__mutmut_8``."""
    module, _, generated = mutant.rpartition(".")
    generated = re.sub(r"__mutmut_\d+$", "", generated)
    parts = generated.split("ǁ")
    function = ".".join(p for p in parts[1:] if p) if parts[0] == "x" else generated[2:]
    return module.rpartition(".")[2] + ".py", function


def survivor_lines(group: str, mutants: list[str], workdir: Path) -> list[str]:
    """One markdown line per mutant: file, function and the changed source (old -> new)."""
    if not mutants:
        return []
    out = subprocess.run([sys.executable, "-c", _LINES_SCRIPT], cwd=workdir / group,
                         input=json.dumps(mutants), capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        name, old, new = json.loads(line)
        file, function = function_of(name)
        rows.append(f"- `{file}` `{function}`: `{old}` -> `{new}`")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(GROUPS),
                        help="module group to mutate (repeatable; default: all)")
    parser.add_argument("--list", action="store_true", help="print the groups and exit")
    parser.add_argument("--max-children", type=int, default=2,
                        help="mutants tested in parallel (default 2)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutation",
                        help="staging directory (default build/mutation)")
    parser.add_argument("--diffs", action="store_true", help="print each survivor's diff")
    parser.add_argument("--lines", action="store_true",
                        help="print each survivor as one markdown line (function, old -> new)")
    parser.add_argument("--json", type=Path, help="also write the statuses to this JSON file")
    parser.add_argument("--no-run", action="store_true",
                        help="report the last run's results from the staging directory")
    parser.add_argument("--survivors", action="store_true",
                        help="re-run only the mutants the last run did not kill, and merge")
    args = parser.parse_args(argv)
    if args.list:
        for name, group in GROUPS.items():
            print(f"{name}: {', '.join(group.files)}\n    tests: {', '.join(group.tests)}")
        return 0
    names = args.module or list(GROUPS)
    results: dict[str, dict[str, str]] = {}
    for name in names:
        if args.no_run:
            saved = args.workdir / name / "statuses.json"
            if not saved.exists():
                raise SystemExit(f"no results for {name!r} in {saved.parent}; run it first")
            results[name] = json.loads(saved.read_text())
            continue
        print(f"== {name}: mutating {', '.join(GROUPS[name].files)}", flush=True)
        results[name] = run_group(name, GROUPS[name], args.workdir, args.max_children,
                                  survivors_only=args.survivors)
        print(table({name: results[name]}).splitlines()[-1], flush=True)
    print()
    print(table(results))
    left = survivors(results)
    if left and args.lines:
        for name in results:
            rows = survivor_lines(name, [m for g, m, _ in left if g == name], args.workdir)
            print(f"\n{name} ({len(rows)}):\n" + "\n".join(rows) if rows else "", end="")
        print()
    elif left:
        print(f"\n{len(left)} not killed:")
        for group, mutant, status in left:
            print(f"  [{group}] {mutant}: {status}")
            if args.diffs:
                print("    " + show(group, mutant, args.workdir).replace("\n", "\n    "))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
