"""The launchers' shared arguments (hpc/launch_args.py): one parent parser for ``train``,
``submit``, ``sbatch`` and ``sweep``, one function that writes parsed arguments back into a
command line, and help that answers without torch, Ray, submitit or DALI."""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.launch_args import argv_of, command_line, config_ref, run_arguments_parser
from medattn.command import command_parser

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "submitit", "nvidia.dali", "pandas")


def _loaded_after(argv: list[str]) -> dict:
    """Run ``medattn ARGV`` in a fresh interpreter; the exit status, its output and which heavy
    packages it imported."""
    code = ("import json, sys, time\n"
            "t0 = time.perf_counter()\n"
            "from medattn.cli import main\n"
            "try:\n"
            f"    rc = main({argv!r})\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "seconds = time.perf_counter() - t0\n"
            f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
            "print('RESULT ' + json.dumps({'rc': rc, 'heavy': heavy, 'seconds': seconds}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stdout + r.stderr
    out = json.loads(line[-1][len("RESULT "):])
    out["text"] = r.stdout + r.stderr
    return out


@pytest.mark.parametrize("command", ["submit", "sbatch", "sweep"])
def test_launcher_help_imports_no_heavy_package(command):
    got = _loaded_after([command, "--help"])
    print(f"medattn {command} --help: {got['seconds']:.2f} s")  # speed lives in the output, not in an assert
    assert got["rc"] == 0, got["text"]
    assert got["heavy"] == [], f"`medattn {command} --help` imported {got['heavy']}"
    # the run's arguments come from the shared parent parser
    for flag in ("--config", "--data", "--out", "key=value"):
        assert flag in got["text"], (command, flag)


def test_top_level_help_imports_no_heavy_package():
    got = _loaded_after(["--help"])
    assert got["rc"] == 0 and "submit" in got["text"] and got["heavy"] == [], got["text"]


def test_launcher_parse_errors_come_before_torch():
    """A mistyped flag is reported by argparse (exit 2) before any heavy import."""
    got = _loaded_after(["submit", "--config", "demo", "--data", "d", "--out", "o", "--nodes", "two"])
    assert got["rc"] == 2 and "--nodes: invalid int value: 'two'" in got["text"], got["text"]
    assert got["heavy"] == []


def test_the_launchers_declare_no_run_argument_of_their_own():
    """--config/--data/--out/--stages are spelled once, in hpc/launch_args.py: jobs/ and sweeps/
    take them from the parent parser."""
    bad = []
    for path in sorted([*(REPO / "jobs").rglob("*.py"), *(REPO / "sweeps").rglob("*.py"), REPO / "hpc" / "train.py"]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in ("--config", "--data", "--out", "--stages")):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.args[0].value}")
    assert not bad, bad


def test_command_line_parses_back():
    argv = command_line("demo", "/d", "/r", ["local", "fusion"], ["agcnn.tau=0.6", "stages.*.epochs=2"])
    assert argv == ["--config", "demo", "--data", "/d", "--out", "/r", "--stages", "local,fusion",
                    "agcnn.tau=0.6", "stages.*.epochs=2"]
    args = run_arguments_parser().parse_args(argv)
    assert (args.config, args.data, args.out, args.stages, args.overrides) == (
        "demo", "/d", "/r", "local,fusion", ["agcnn.tau=0.6", "stages.*.epochs=2"])
    assert command_line("demo", "/d", "/r") == ["--config", "demo", "--data", "/d", "--out", "/r"]


def test_config_ref_names_files_absolutely_and_shipped_configs_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("method: agcnn\n")
    (tmp_path / "demo").write_text("method: agcnn\n")  # a shipped name wins, as in load_config
    assert config_ref("demo") == "demo"
    assert config_ref("mine.yaml") == str(tmp_path / "mine.yaml")
    assert config_ref("./mine.yaml") == str(tmp_path / "mine.yaml")
    assert config_ref("nope.yaml") == "nope.yaml"  # left for load_config to report


def _sweep_module():
    import sweeps.cli

    return sweeps.cli


# Every option of a sweep that reaches its driver, with a value that is not the default.
SWEEP_OPTIONS = ["--space", "tau=uniform(0.5,0.9)", "--space", "gamma=choice(0,1)", "--num-samples", "3",
                 "--search", "random", "--scheduler", "none", "--grace-period", "2", "--reduction-factor", "4",
                 "--max-concurrent", "2", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2",
                 "--nproc-per-trial", "2", "--trial-resource", "slot=1", "--trial-resource", "mem=3",
                 "--max-failures", "3", "--seed", "7", "--no-reuse", "--quiet"]


def test_sweep_slurm_script_passes_every_sweep_option_on(tmp_path, monkeypatch):
    """``medattn sweep --slurm`` writes the sweep's own arguments into its batch script with the
    one rebuild function: parsed again they give the same sweep (paths made absolute), and the
    SLURM flags stay out."""
    from sweeps.plan import sweep_parser
    from sweeps.slurm import _sweep_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("method: agcnn\n")
    mod = _sweep_module()
    argv = ["--slurm", "--profile", "local", "--nodes", "2", "--config", "base.yaml", "--data", "prep",
            "--out", "sw", *SWEEP_OPTIONS, "stages.local.loss=focal"]
    args = command_parser("sweep", mod).parse_intermixed_args(argv)
    # the test covers every option the sweep parser declares (a new option must be added above)
    declared = {a.option_strings[-1] for a in sweep_parser()._actions
                if a.option_strings and a.help != argparse.SUPPRESS} - {"--config", "--data", "--out", "--address"}
    assert declared <= set(SWEEP_OPTIONS), declared - set(SWEEP_OPTIONS)

    rebuilt = _sweep_args(args)
    assert not {"--slurm", "--profile", "--nodes"} & set(rebuilt)
    again = command_parser("sweep", mod).parse_intermixed_args(rebuilt)
    want = dict(vars(args), slurm=False, profile=None, nodes=None, config=str(tmp_path / "base.yaml"),
                data=str(tmp_path / "prep"), out=str(tmp_path / "sw"))
    assert vars(again) == want


def test_one_parent_parser_for_train_submit_sbatch_and_sweep():
    """The run group of every launcher is the same declaration (same flags, same required-ness)."""
    import hpc.train
    import jobs.sbatch
    import jobs.submit

    def run_flags(mod) -> dict[str, bool]:
        p = command_parser("x", mod)
        return {a.option_strings[-1] if a.option_strings else a.dest: a.required for a in p._actions
                if a.dest in ("config", "data", "out", "stages", "overrides")}

    train = run_flags(hpc.train)
    assert set(train) == {"--config", "--data", "--out", "--stages", "overrides"} and train["--config"]
    assert run_flags(jobs.submit) == train and run_flags(jobs.sbatch) == train
    assert run_flags(_sweep_module()) == {k: v for k, v in train.items() if k != "--stages"}


def test_argv_of_writes_flags_lists_and_positionals():
    p = argparse.ArgumentParser()
    p.add_argument("-n", "--num", type=int, default=None)
    p.add_argument("--flag", action="store_true")
    p.add_argument("--item", action="append", default=[])
    p.add_argument("--internal", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*")
    args = p.parse_intermixed_args(["a", "--num", "3", "--item", "x", "--item", "y", "--internal", "4", "b"])
    assert argv_of(p, args) == ["--num", "3", "--item", "x", "--item", "y", "a", "b"]
    assert argv_of(p, p.parse_args([])) == []
    assert argv_of(p, p.parse_args(["--flag"])) == ["--flag"]
