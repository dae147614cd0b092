"""Cluster settings without a cluster: profiles and flags, the shared-filesystem check, and
the parsers of SLURM's output (hand-written expectations)."""
from __future__ import annotations

import argparse
import os

import pytest

from jobs import cluster
from jobs.cluster import ClusterError, ClusterSpec
from medattn.errors import ConfigError


def _args(*argv):
    p = argparse.ArgumentParser()
    cluster.add_cluster_arguments(p)
    return p.parse_args(list(argv))


def test_flags_override_the_profile(tmp_path):
    prof = tmp_path / "c.yaml"
    prof.write_text("partition: gpu\nnodes: 4\ngpus_per_node: 8\ncpus-per-task: 6\ntime: 600\n"
                    "setup: module load cuda\nenv: {NCCL_DEBUG: WARN, X: 1}\nsbatch: {exclusive: true}\n")
    s = cluster.resolve_spec(_args("--profile", str(prof), "--nodes", "2", "--setup", "echo hi", "--time", "30"))
    assert (s.partition, s.nodes, s.gpus_per_node, s.cpus_per_task, s.time) == ("gpu", 2, 8, 6, 30)
    assert s.tasks == 8 and s.world_size == 16  # one process per GPU
    assert s.setup == ["module load cuda", "echo hi"] and s.env == {"NCCL_DEBUG": "WARN", "X": "1"}
    assert s.sbatch == {"exclusive": True} and s.signal_delay == 120 and not s.allow_local_dirs
    # no GPUs: one task per node unless asked
    assert cluster.resolve_spec(_args()).tasks == 1
    assert cluster.resolve_spec(_args("--tasks-per-node", "3")).world_size == 3


def test_shipped_profile_by_name():
    s = cluster.resolve_spec(_args("--profile", "local"))
    assert s.partition == "debug" and s.allow_local_dirs and s.env["OMP_NUM_THREADS"] == "1"
    s = cluster.resolve_spec(_args("--profile", "example-gpu"))
    assert s.gpus_per_node == 8 and s.tasks == 8


@pytest.mark.parametrize("text, needle", [
    ("partiton: gpu\n", "unknown key 'partiton' (did you mean 'partition'?)"),
    ("nodes: 0\n", "nodes must be an integer >= 1, got 0"),
    ("gpus_per_node: two\n", "gpus_per_node must be an integer >= 0"),
    ("mem: -3\n", "mem is in GB per node"),
    ("setup: {a: 1}\n", "setup must be a list of shell lines"),
    ("env: {1BAD: x}\n", "'1BAD' is not a valid environment variable name"),
    ("allow_local_dirs: yes please\n", "allow_local_dirs must be true or false"),
    ("- partition\n", "a profile is a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_profiles_name_the_file_and_key(tmp_path, text, needle):
    prof = tmp_path / "bad.yaml"
    prof.write_text(text)
    with pytest.raises(ConfigError) as e:
        cluster.resolve_spec(_args("--profile", str(prof)))
    assert str(prof) in str(e.value) and needle in str(e.value)


def test_bad_flags_and_missing_profile():
    with pytest.raises(ConfigError, match="no such file .shipped profiles: .*local"):
        cluster.resolve_spec(_args("--profile", "nosuch"))
    with pytest.raises(ConfigError, match="one process per GPU"):
        cluster.resolve_spec(_args("--gpus-per-node", "4", "--tasks-per-node", "2"))
    with pytest.raises(ConfigError, match="--signal-delay: signal_delay must be an integer >= 1"):
        cluster.resolve_spec(_args("--signal-delay", "0"))


@pytest.mark.parametrize("path", ["/tmp/x/run", "/dev/shm/run", "/var/tmp/run", "/run/user/run"])
def test_node_local_run_dirs_are_refused(path):
    with pytest.raises(ClusterError, match="local to each node"):
        cluster.check_shared_path(path, "--out", allow_local=False, must_exist=False)


def test_shared_path_rules(tmp_path):
    # tmp_path lives under /tmp: fine only on a single-host cluster
    assert cluster.check_shared_path(tmp_path / "run", "--out", True, False) == tmp_path / "run"
    with pytest.raises(ClusterError, match=r"parent directory .*/nope does not exist"):
        cluster.check_shared_path(tmp_path / "nope" / "run", "--out", True, False)
    with pytest.raises(ClusterError, match="--data .*: does not exist"):
        cluster.check_shared_path(tmp_path / "nodata", "--data", True, True)
    # a link from a shared-looking place into /tmp is still node-local
    home_like = tmp_path / "home"
    home_like.mkdir()
    link = home_like / "runs"
    os.symlink(tmp_path, link)
    with pytest.raises(ClusterError, match="/tmp is local to each node"):
        cluster.check_shared_path(link / "r", "--out", False, False)


@pytest.mark.parametrize("gres, n", [
    ("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:4,gpu:v100:2", 6),
    ("gpu:tesla:2(S:0),shard:8", 2), ("mps:100", 0), ("gpu", 1),
])
def test_gpu_count_from_sinfo_gres(gres, n):
    assert cluster.gpu_count(gres) == n


@pytest.mark.parametrize("text, minutes", [
    ("UNLIMITED", None), ("infinite", None), ("30", 30), ("1:30:00", 90), ("2-00:00:00", 2880),
    ("1-12", 2160), ("00:10:30", 11), ("45:00", 45),
])
def test_parse_slurm_time(text, minutes):
    assert cluster.parse_slurm_time(text) == minutes


def test_default_time_follows_the_partition():
    p = cluster.Partition("p", "UP", True, 2, None, max_time=120, default_time=None, node_groups=[])
    assert cluster.default_time(ClusterSpec(), p) == 120
    p.default_time = 45
    assert cluster.default_time(ClusterSpec(), p) == 45
    assert cluster.default_time(ClusterSpec(time=10), p) == 10
    assert cluster.default_time(ClusterSpec(), None) == 240


def test_clean_slurm_env_hides_an_enclosing_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    with cluster.clean_slurm_env():
        assert "SLURM_JOB_ID" not in os.environ and "RANK" not in os.environ
        assert os.environ["SLURM_CONF"] == "/etc/slurm/slurm.conf"
    assert os.environ["SLURM_JOB_ID"] == "7" and os.environ["RANK"] == "3"


@pytest.mark.parametrize("value, minutes", [("12:00:00", 720), ("1-00:00:00", 1440), ("90", 90), ("45:30", 46),
                                            ("2-06", 3240)])
def test_time_takes_every_slurm_format_in_flags_and_profiles(tmp_path, value, minutes):
    assert cluster.resolve_spec(_args("--time", value)).time == minutes
    prof = tmp_path / "p.yaml"
    prof.write_text(f"time: '{value}'\n")
    assert cluster.resolve_spec(_args("--profile", str(prof))).time == minutes


@pytest.mark.parametrize("value", ["12h", "1:2:3:4", "0", "-1", "1-", "abc"])
def test_bad_times_are_refused_naming_the_formats(value):
    with pytest.raises(ConfigError, match=r"--time: time .* (not a SLURM time \(MM, MM:SS, HH:MM:SS|at least one)"):
        cluster.resolve_spec(_args("--time", value))


def _partition(*groups):
    return cluster.Partition("gpu", "UP", True, 8, None, None, None,
                             [{"count": n, "cpus": c, "gres": f"gpu:{g}", "gpus": g, "mem_mb": 1e6} for n, c, g in groups])


def test_cpus_per_task_defaults_to_the_cpus_of_the_gpus_used():
    # 8-GPU nodes with 64 and 96 cores: the smaller node decides, 64 / 8 per GPU process
    part = _partition((2, 64, 8), (2, 96, 8))
    assert cluster.default_cpus_per_task(ClusterSpec(gpus_per_node=8), part)[0] == 8
    assert cluster.default_cpus_per_task(ClusterSpec(gpus_per_node=2), part)[0] == 8
    # one task driving 4 of the 8 GPUs (a sweep's Ray node): half the node
    assert cluster.default_cpus_per_task(ClusterSpec(gpus_per_node=4, tasks_per_node=None), part)[0] == 8
    spec = ClusterSpec(gpus_per_node=4)
    spec.tasks_per_node = 1
    assert cluster.default_cpus_per_task(spec, part)[0] == 32
    # CPU nodes: the node's cores shared by its tasks
    cpu = _partition((4, 32, 0))
    assert cluster.default_cpus_per_task(ClusterSpec(tasks_per_node=2), cpu)[0] == 16
    # nothing known: the documented fallback
    assert cluster.default_cpus_per_task(ClusterSpec(gpus_per_node=8), None)[0] == cluster.FALLBACK_CPUS_PER_GPU_TASK
    assert cluster.default_cpus_per_task(ClusterSpec(), None)[0] == cluster.FALLBACK_CPUS_PER_CPU_TASK
    # check_against_cluster fills it in, and an explicit value wins
    s = ClusterSpec(gpus_per_node=8, partition="gpu")
    cluster.check_against_cluster(s, {"gpu": part})
    assert s.cpus_per_task == 8
    s = ClusterSpec(gpus_per_node=8, partition="gpu", cpus_per_task=4)
    cluster.check_against_cluster(s, {"gpu": part})
    assert s.cpus_per_task == 4


@pytest.mark.parametrize("time_arg, minutes", [("12:00:00", 720), ("1-00:00:00", 1440)])
def test_sbatch_takes_slurm_times_and_passes_cpus_per_task_to_srun(tmp_path, monkeypatch, capsys, time_arg, minutes):
    """Written where SLURM cannot be asked (no client commands): the documented fallback of 8 CPUs
    per GPU process, passed to srun explicitly (srun stopped inheriting it in Slurm 22.05)."""
    import subprocess

    from medattn.cli import main
    from prepfix import make_prepared

    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a machine without SLURM's client commands
    prep = make_prepared(tmp_path / "prep", n=32, size=16)
    (tmp_path / "runs").mkdir()
    script = tmp_path / "job.sbatch"
    rc = main(["sbatch", "--config", "demo", "--data", str(prep), "--out", str(tmp_path / "runs" / "r"), "--nodes",
               "2", "--gpus-per-node", "4", "--time", time_arg, "--allow-local-dirs", "--output", str(script)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    text = script.read_text()
    assert f"#SBATCH --time={minutes}\n" in text
    assert "#SBATCH --cpus-per-task=32\n" in text  # one torchrun task per node: 4 processes x 8
    assert "srun --ntasks-per-node=1 --cpus-per-task=32 " in text
    subprocess.run(["/bin/bash", "-n", str(script)], check=True)
    # submitit's script for `medattn submit` passes it to srun too
    rc = main(["submit", "--config", "demo", "--data", str(prep), "--out", str(tmp_path / "runs" / "r"), "--nodes", "2",
               "--gpus-per-node", "4", "--time", time_arg, "--allow-local-dirs", "--dry-run"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"#SBATCH --time={minutes}\n" in cap.out and "#SBATCH --cpus-per-task=8\n" in cap.out
    assert "--cpus-per-task=8" in [line for line in cap.out.splitlines() if line.startswith("srun")][0]
