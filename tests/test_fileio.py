"""medattn.fileio: the one atomic write, with one durability rule (file and folder fsync'd), used
by every writer of a file that a resume, a loader or a reader depends on."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from medattn import fileio

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("medattn", "hpc", "jobs", "sweeps")


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync is called on (read from /proc/self/fd), in order."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name a file descriptor")
    seen: list[Path] = []
    real = os.fsync

    def fsync(fd):
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _durable(seen: list[Path], path: Path) -> None:
    """``path``'s data were synced before the rename (under a temporary name in its folder) and
    its folder after."""
    folder = path.parent.resolve()
    tmp = [p for p in seen if p.parent == folder and p.name.startswith(f".{path.name}.tmp")]
    assert tmp, f"{path}: its data were never fsync'd ({seen})"
    assert folder in seen[seen.index(tmp[-1]):], f"{path}: its folder was not fsync'd after the rename ({seen})"


def test_write_syncs_the_file_then_the_folder_and_leaves_no_temporary(tmp_path, synced):
    p = tmp_path / "sub" / "state.json"
    fileio.write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    _durable(synced, p)
    assert sorted(x.name for x in p.parent.iterdir()) == ["state.json"]


@pytest.mark.parametrize("how", ["file", "path", "torch"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, how):
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        if how == "file":
            with fileio.atomic_file(p) as f:
                f.write(b"half of the new")
                raise Boom
        elif how == "path":
            with fileio.atomic_path(p) as tmp:
                tmp.write_bytes(b"half")
                raise Boom
        else:
            class Unpicklable:
                def __reduce__(self):
                    raise Boom

            from hpc.checkpoint import atomic_torch_save
            atomic_torch_save({"w": torch.zeros(3), "bad": Unpicklable()}, p)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["x.bin"]


def test_keep_previous_keeps_the_replaced_file_and_the_target_never_disappears(tmp_path):
    p, prev = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    fileio.write_bytes(p, b"one", keep_previous=prev)
    assert p.read_bytes() == b"one" and not prev.exists()  # nothing to keep yet
    seen = []
    fileio.write_bytes(p, b"two", keep_previous=prev)
    with fileio.atomic_file(p, keep_previous=prev, before_replace=lambda: seen.append(
            (p.read_bytes(), prev.read_bytes()))) as f:
        f.write(b"three")
    assert seen == [(b"two", b"two")]  # just before the rename: both hold the old content
    assert (p.read_bytes(), prev.read_bytes()) == (b"three", b"two")


def test_a_folder_replaces_a_folder_and_temporaries_are_removed(tmp_path):
    dest = tmp_path / "report"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with fileio.atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "index.html").write_text("new")
    assert [x.name for x in dest.iterdir()] == ["index.html"]
    stale = fileio.temp_name(tmp_path / "state.json")
    stale.write_text("half")
    assert fileio.remove_temporaries(tmp_path) == [stale]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["report"]


def test_the_writers_that_resumes_and_readers_depend_on_use_it(tmp_path, synced):
    """Checkpoints (with their previous one), state, records rewritten, config, the prepared
    manifest and dataset.json: each synced as the rule says."""
    from hpc.run import Run
    from medattn.config import load_config
    from medattn.data.fake import write_fake_prepared
    from medattn.data.prepared import Prepared

    run = Run(tmp_path / "run")
    run.save_config(load_config("demo"))
    run.save_checkpoint("global", "last", {"step": 1})
    run.save_checkpoint("global", "last", {"step": 2}, background=True)
    run.save_checkpoint("global", "best", {"step": 2})
    run.mark_stage("global", done=True)
    run.append_record({"stage": "global", "epoch": 1})
    run.drop_records_from("global", 0)
    for p in (run.config_path, run.checkpoint("global", "last"), run.checkpoint("global", "best"), run.state_path,
              run.metrics_path):
        _durable(synced, p)
    assert torch.load(run.previous_checkpoint("global"))["step"] == 1
    assert torch.load(run.checkpoint("global", "last"))["step"] == 2

    synced.clear()
    prep = Prepared(write_fake_prepared(tmp_path / "prep", n=16, size=32, seed=0))
    _durable(synced, prep.manifest_path)
    _durable(synced, prep.info_path)


def _replacing_calls(path: Path) -> list[tuple[int, str]]:
    """Renames in ``path``: os.replace/os.rename/shutil.move, ``x.rename(...)`` and a one-argument
    ``x.replace(y)`` (Path.replace; str.replace takes two, DataFrame.replace a mapping)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f, attr = node.func, node.func.attr
        owner = f.value.id if isinstance(f.value, ast.Name) else ""
        if (owner, attr) in (("os", "replace"), ("os", "rename"), ("shutil", "move")) or attr == "rename":
            out.append((node.lineno, f"{owner or '<obj>'}.{attr}"))
        elif (attr == "replace" and owner != "os" and len(node.args) == 1 and not node.keywords
              and not isinstance(node.args[0], (ast.Dict, ast.Constant))):
            out.append((node.lineno, f"{owner or '<obj>'}.replace"))
    return out


def test_only_the_helper_renames_files_into_place():
    found = []
    for pkg in PRODUCT:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path == REPO / "medattn" / "fileio.py":
                continue
            found += [f"{path.relative_to(REPO)}:{line}: {what}" for line, what in _replacing_calls(path)]
    assert not found, "write-then-rename outside medattn.fileio (use fileio.atomic_path/atomic_file/" \
                      "publish):\n" + "\n".join(found)


def test_the_rename_finder_sees_each_spelling(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os, shutil\nos.replace(a, b)\ntmp.replace(out)\np.rename(q)\nshutil.move(a, b)\n"
                   "s.replace('a', 'b')\ndf.replace({'x': 'y'})\n")
    assert [w for _, w in _replacing_calls(src)] == ["os.replace", "tmp.replace", "p.rename", "shutil.move"]
