"""The layer rule (docs/architecture.md), checked over every import of the product, the lazy ones
inside functions included:

    medattn (science)  <  hpc (runtime)  <  jobs (SLURM)  <  sweeps (Ray Tune)  <  the CLI

A module imports only its own layer and the layers below it. The CLI (``medattn.cli`` and
``python -m medattn``) sits above all. Also: every file name of a run directory is spelled in
one module only (``hpc/run.py``), so its layout has one owner.
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
RUN_FILES = ("best.pt", "last.pt", "state.json", "metrics.jsonl",
             "train.log", "sweep_trial.json", "jobs.jsonl", "sbatch-")  # the last four: what jobs/ and sweeps/ add


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
