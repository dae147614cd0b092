"""The layer rule (docs/architecture.md), checked over every import of the product, the lazy ones
inside functions included:

    medattn (science)  <  hpc (runtime)  <  jobs (SLURM)  <  sweeps (Ray Tune)  <  the CLI

A module imports only its own layer and the layers below it. The CLI (``medattn.cli`` and
``python -m medattn``) sits above all. Also: every file name of a run directory is spelled in
one module only (``hpc/run.py``), so its layout has one owner, and every file name of a prepared
directory in ``medattn/data/prepared.py`` (``Prepared``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"medattn": 0, "hpc": 1, "jobs": 2, "sweeps": 3}
TOP = {"medattn.cli", "medattn.__main__", "medattn.api"}  # the command line and the Python API: above every layer
# The one import allowed upwards: the package's lazy ``medattn.load`` forward to the API module
# (a module-level ``__getattr__``: nothing is imported until a user asks for ``medattn.load``).
FORWARDS = {("medattn", "medattn.api")}
RUN_FILES = ("best.pt", "last.pt", "last.prev.pt", "last.unreadable.pt", "state.json", "metrics.jsonl",
             "train.log", "sweep_trial.json", "jobs.jsonl", "sbatch-")  # the last four: what jobs/ and sweeps/ add
# The prepared directory's files: spelled as file names only in medattn/data/prepared.py (Prepared).
# Docstrings and messages may mention them; a string that is the name, or a path ending in it, may not.
PREPARED_FILES = ("dataset.json", "manifest.parquet")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out.append((name, path))
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement and importlib.import_module("...")."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def _layer(module: str) -> int | None:
    if module in TOP:
        return 99
    return LAYERS.get(module.split(".")[0])


def test_modules_are_found():
    names = [m for m, _ in _modules()]
    assert "hpc.train" in names and "medattn.attention" in names and "sweeps.cli" in names
    assert len(names) > 80


def test_imports_point_down_the_layers():
    bad = []
    for module, path in _modules():
        mine = _layer(module)
        for line, target in _imports(path, module):
            theirs = _layer(target)
            if theirs is not None and theirs > mine and (module, target) not in FORWARDS:
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} imports {target}")
    assert not bad, "imports against the layer rule (docs/architecture.md):\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_importlib_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom . import sibling\n\ndef f():\n    from hpc.run import Run\n"
                   "    import importlib\n    importlib.import_module('sweeps.cli')\n")
    got = {t for _, t in _imports(src, "medattn.data.m")}
    assert {"os", "medattn.data", "hpc.run", "sweeps.cli"} <= got


def test_import_medattn_stays_light():
    """``import medattn`` (the science package) loads no layer above it and no torch until
    ``medattn.load`` is used."""
    import subprocess
    import sys

    code = ("import sys, medattn; assert 'load' in dir(medattn); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hpc', 'torch') or m == 'medattn.api'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", RUN_FILES)
def test_each_run_file_name_has_one_owner(name):
    owners = sorted(str(p.relative_to(REPO)) for _, p in _modules() if name in p.read_text())
    assert owners == ["hpc/run.py"], f"{name!r} is spelled in {owners}; only hpc/run.py may know it"


# --------------------------------------------------------------------------------------------
# no import circles, and the floors inside the runtime
# --------------------------------------------------------------------------------------------
def _graph() -> dict[str, set[str]]:
    """module -> the product modules it names in an import (lazy ones included). ``from pkg
    import name`` names ``pkg.name`` when that is a module, else ``pkg``; a package is not an
    edge of its own submodules (Python loads it first anyway, and ``medattn/__init__`` imports
    nothing above it at import time)."""
    mods = dict(_modules())
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        out: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
                out |= subs
                if len(subs) < len(node.names):
                    out.add(target)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
                  "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                out.add(str(node.args[0].value))
        graph[module] = {t for t in out if t in mods and t != module and not module.startswith(t + ".")}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = _graph()
    circles = _circles(graph)
    lines = [" <-> ".join(c) + ": " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in circles]
    assert not circles, "import circles among product modules (lazy imports count):\n" + "\n".join(lines)


# The floors inside the runtime (docs/architecture.md, "Using a trained run"): a module imports
# only its own floor and the floors below. Modules not named are the runtime core (floor 0).
HPC_FLOORS = {
    "hpc.inference": 1, "hpc.overlays": 1,  # the inference floor: a run back, predictions, overlays
    "hpc.train": 2, "hpc.evaluate": 2, "hpc.clinical_eval": 2, "hpc.external_eval": 2,
    "hpc.calibrated": 2, "hpc.predict": 2,  # what uses a model
    "hpc.export": 3,  # builds on predict
    "hpc.report": 4, "hpc.bench": 4, "hpc.benchmarks": 4,  # leaves: only the CLI (and scripts) import them
}


def _floor(module: str) -> int:
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in HPC_FLOORS:
            return HPC_FLOORS[".".join(parts[:k])]
    return 0


def test_runtime_floors():
    bad = []
    for module, targets in _graph().items():
        if not module.startswith("hpc."):
            continue
        for t in targets:
            if t.startswith("hpc.") and _floor(t) > _floor(module):
                bad.append(f"{module} (floor {_floor(module)}) imports {t} (floor {_floor(t)})")
    assert not bad, "imports against the runtime's floors:\n" + "\n".join(sorted(bad))


def test_the_report_is_a_leaf():
    """Nothing but the report itself and the command line imports hpc.report; the trainer,
    predict and export import nothing from it."""
    users = sorted(f"{m} -> {t}" for m, ts in _graph().items() for t in ts
                   if t.split(".")[:2] == ["hpc", "report"] and m.split(".")[:2] != ["hpc", "report"]
                   and m not in TOP)
    assert users == [], users


# The files of an evaluation folder (RUN/eval...), spelled as string literals only by their owner.
# `medattn predict --out` defaults to a preds.csv in the working directory: a user's file, not a run's.
EVAL_FILES = {"metrics.json": set(), "preds.csv": {"hpc/predict.py"}, "per_image.csv": set(), "boxes.csv": set()}


@pytest.mark.parametrize("name", sorted(EVAL_FILES))
def test_each_eval_file_name_has_one_owner(name):
    owners = set()
    for _, p in _modules():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value == name or node.value.endswith("/" + name)):
                owners.add(str(p.relative_to(REPO)))
    assert owners - EVAL_FILES[name] == {"hpc/run.py"}, f"{name!r} is spelled in {sorted(owners)}"


def _file_name_literals(path: Path, name: str) -> list[int]:
    """Lines of string literals (f-string parts included) that are ``name`` or a path ending in
    it (``"x/name"``, ``"name.tmp"``); docstrings and sentences that mention it do not count."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            v = node.value.strip()
            if v == name or v.endswith("/" + name) or v.startswith(name + ".") or v.startswith("/" + name):
                out.append(node.lineno)
    return sorted(out)


@pytest.mark.parametrize("name", PREPARED_FILES)
def test_each_prepared_file_name_has_one_owner(name):
    owners = sorted(f"{p.relative_to(REPO)}:{line}" for _, p in _modules() for line in _file_name_literals(p, name))
    assert [o.split(":")[0] for o in owners] == ["medattn/data/prepared.py"], \
        f"{name!r} is spelled as a file name in {owners}; only medattn.data.prepared.Prepared may know it"


def test_the_prepared_name_finder_sees_paths_not_sentences(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Reads dataset.json."""\na = root / "dataset.json"\nb = f"{root}/dataset.json"\n'
                   'c = "dataset.json.tmp"\nd = "no dataset.json here: run prepare"\n')
    assert _file_name_literals(src, "dataset.json") == [2, 3, 4]
