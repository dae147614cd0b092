"""`medattn submit` and `medattn sbatch` on a real two-node SLURM cluster (scripts/slurm-local.sh:
slurmctld + slurmd n1, n2 on this host, munge): a stage chain on 2 nodes x 1 task (gloo),
equal to one process; a job preempted by a higher-priority partition that checkpoints,
requeues and resumes on every rank;
a generated sbatch script that requeues itself and completes; time-outs counted against
--max-timeouts, with the failure reported by --wait; wrong settings refused at submit time
with nothing left queued.

Skipped when slurm-wlm/munge are not installed or not root (`make system-deps`).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from prepfix import make_prepared
from slurm_util import (RequeueNudger, env, job_ids, job_info, medattn, queued, records, start_cluster,
                        stop_cluster, wait_for_line, wait_jobs)

pytestmark = pytest.mark.slurm

# As tests/test_train.py, with 3 global epochs (4 steps each): a job signalled at step 2 of
# epoch 1 has two and a half epochs left to be interrupted in.
BASE = ["data.image_size=32", "data.resize=40", "stages.*.epochs=2", "stages.*.batch_size=16",
        "data.num_workers=2", "runtime.log_every=2", "runtime.tensorboard=false", "stages.global.epochs=3"]
SIGNAL_AT = "[global] epoch 1/3 step 2/4"  # rank 0's progress line after two steps
TWO_NODES = ["--profile", "local", "--nodes", "2"]


@pytest.fixture(scope="module")
def cluster():
    was_up = start_cluster()
    with RequeueNudger() as nudger:
        yield nudger
    if not was_up:
        stop_cluster()


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=128, size=48, seed=1)


@pytest.fixture(scope="module")
def chain(cluster, prep, tmp_path_factory):
    """The demo's three stages as a chain of three jobs, each on 2 nodes x 1 task."""
    run = tmp_path_factory.mktemp("chain") / "run"
    t0 = time.time()
    r = medattn("submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, "--wait", "--poll", "1", *BASE)
    print(f"chain of 3 jobs on 2 nodes: {time.time() - t0:.1f} s")
    assert r.returncode == 0, r.stdout + r.stderr
    return run, r.stdout


def _stage_of_records(run, stage):
    return [x for x in records(run) if x["stage"] == stage]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _assert_same_epochs(got, ref):
    """Same per-epoch records, the cut epoch's training loss included (its running sums are
    in the checkpoint)."""
    assert [(x["stage"], x["epoch"], x["global_step"]) for x in got] == \
           [(x["stage"], x["epoch"], x["global_step"]) for x in ref]
    for g, r in zip(got, ref):
        for k, v in r.items():
            if k.startswith("val/") and not k.endswith("time_s") or k == "select/best" or k.startswith("train/loss"):
                assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (g["epoch"], k)


def test_chain_runs_the_stages_in_order_on_two_nodes(chain):
    run, out = chain
    ids = job_ids(out)
    assert len(ids) == 3 and "log folder" in out and str(run) in out
    stages = ["global", "local", "fusion"]
    state = json.loads((run / "state.json").read_text())["stages"]
    assert all(state[s]["done"] for s in stages)
    assert [(x["stage"], x["epoch"]) for x in records(run)] == \
        [("global", e) for e in range(1, 4)] + [("local", 1), ("local", 2), ("fusion", 0), ("fusion", 1), ("fusion", 2)]
    assert all(x["world_size"] == 2 for x in records(run))
    # SLURM's own record: each job started after the previous one ended, on both nodes, once
    info = [job_info(j) for j in ids]
    for prev, nxt in zip(info, info[1:]):
        assert nxt["StartTime"] >= prev["EndTime"], (prev["JobId"], nxt["JobId"])
        assert nxt["Dependency"] == "(null)"  # satisfied
    for i, stage in zip(info, stages):
        assert i["JobState"] == "COMPLETED" and i["NodeList"] == "n[1-2]" and i["Restarts"] == "0"
        assert i["JobName"] == f"medattn-run-{stage}"
    # each job trained its own stage, starting from the previous stage's best checkpoint
    for j, stage, prev in zip(ids, stages, [None] + stages[:-1]):
        log = (run / "slurm" / f"{j}_0_log.out").read_text()
        assert f"[{stage}] epoch 1/" in log and not any(f"[{s}] epoch" in log for s in stages if s != stage)
        if prev:
            assert f"[{stage}] initialised from {run}/ckpt/{prev}/best.pt" in log
            assert (run / "ckpt" / prev / "best.pt").stat().st_mtime <= \
                time.mktime(time.strptime(job_info(j)["StartTime"], "%Y-%m-%dT%H:%M:%S")) + 1
    prov = json.loads((run / "provenance.json").read_text())
    assert [p["slurm_job_id"] for p in prov] == ids
    assert all(p["world_size"] == 2 and p["launcher"] == "slurm" and len(p["hosts"]) == 2 for p in prov)


def test_two_nodes_match_one_process(chain, prep, tmp_path):
    """The fusion stage trains a linear head on frozen branches (BatchNorm in eval mode), so 2
    ranks on 2 nodes must equal 1 process from the same global+local weights, up to float
    summation order (as tests/test_train.py::test_two_processes_match_one)."""
    run, _ = chain
    ref = tmp_path / "ref"
    shutil.copytree(run, ref, ignore=shutil.ignore_patterns("slurm"))
    shutil.rmtree(ref / "ckpt" / "fusion")
    st = json.loads((ref / "state.json").read_text())
    del st["stages"]["fusion"]
    (ref / "state.json").write_text(json.dumps(st))
    r = subprocess.run([sys.executable, "-m", "medattn", "train", "--config",
                        "demo", "--data", str(prep), "--out", str(ref), "--stages", "fusion", *BASE],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = _stage_of_records(run, "fusion"), _stage_of_records(ref, "fusion")
    # epoch 0: the starting head's validation (agcnn.fusion_init), then the two training epochs
    assert [x["epoch"] for x in two] == [0, 1, 2] and [x["epoch"] for x in one] == [0, 1, 2]
    for k, v in one[0].items():
        if k.startswith("val/fusion/"):
            assert two[0][k] == pytest.approx(v, abs=1e-4), k
    two, one = two[1:], one[1:]
    assert [x["world_size"] for x in two] == [2, 2] and [x["world_size"] for x in one] == [1, 1]
    for a, b in zip(two, one):
        assert a["global_step"] == b["global_step"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6)
        for k, v in b.items():
            if k.startswith("val/fusion/"):
                assert a[k] == pytest.approx(v, abs=1e-4), k


def test_preempted_job_checkpoints_requeues_and_resumes_on_every_rank(chain, prep, tmp_path):
    """A real preemption in the middle of the global stage: a job in the higher-priority
    partition "urgent" needs both nodes, so SLURM sends the running job USR2
    (preempt_send_user_signal). Both ranks stop after the same step, rank 0 checkpoints and
    requeues, the urgent job runs, and the job resumes on both nodes and ends with exactly the
    weights of the uninterrupted chain's global stage. A SIGTERM before it (scancel sends one;
    so does submitit's job._interrupt()) must change nothing."""
    ref_run, _ = chain
    run = tmp_path / "run"
    r = medattn("submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, "--stages", "global", *BASE)
    assert r.returncode == 0, r.stderr
    (jid,) = job_ids(r.stdout)
    wait_for_line(run / "slurm" / f"{jid}_0_log.out", SIGNAL_AT)
    subprocess.run(["scancel", "--signal=TERM", jid], check=True)  # logged and ignored
    t0 = time.time()
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N", "2", "--ntasks-per-node=2", "-o", "/dev/null",
                             "--wrap", "true"], env=env(), capture_output=True, text=True, check=True).stdout.strip()
    states = wait_jobs([jid, urgent], timeout=240)
    print(f"preemption -> requeue -> completed: {time.time() - t0:.1f} s")
    assert states == {jid: "COMPLETED", urgent: "COMPLETED"}
    assert job_info(jid)["Restarts"] == "1"
    assert job_info(urgent)["StartTime"] < job_info(jid)["StartTime"]  # it ran while ours waited
    log0, log1 = ((run / "slurm" / f"{jid}_{t}_log.out").read_text() + (run / "slurm" / f"{jid}_{t}_log.err").read_text()
                  for t in (0, 1))
    assert "Bypassing signal SIGTERM" in log0 and "Bypassing signal SIGTERM" in log1
    # in a step (stops at the next agreed step) or in validation (stops once the epoch is saved)
    m = re.search(r"\[global\] epoch (\d+)/\d+ stopped by signal 12 (at step (\d+)|after epoch \d+);", log0)
    assert m, log0[-3000:]
    epoch = int(m.group(1))
    resume = (epoch, int(m.group(3))) if m.group(3) else (epoch + 1, 0)
    assert f"resuming at epoch {resume[0]} step {resume[1]} " in log0
    assert "this job is preempted" in log0 and "Requeued job" in log0
    assert "checkpoint complete on every rank" in log1 and "attempt 2" in log1  # rank 1 came back too
    got = _stage_of_records(run, "global")
    assert [x["epoch"] for x in got] == [1, 2, 3]  # no epoch twice, none missing
    _assert_same_epochs(got, _stage_of_records(ref_run, "global"))
    _assert_same_weights(run / "ckpt" / "global" / "last.pt", ref_run / "ckpt" / "global" / "last.pt")


def test_sbatch_script_requeues_itself_and_completes(chain, prep, tmp_path):
    """The plain sbatch recipe (srun -> torchrun per node): USR2 to the batch shell (as
    --signal=B:USR2 delivers it) is forwarded to the trainer, which checkpoints; the script
    requeues the job, which resumes and completes with the chain's global-stage weights."""
    ref_run, _ = chain
    run, script = tmp_path / "run", tmp_path / "job.sbatch"
    r = medattn("sbatch", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, "--stages", "global",
                "--output", script, *BASE)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["sbatch", "--parsable", str(script)], env=env(),
                       capture_output=True, text=True, check=True)
    jid = r.stdout.strip().split(";")[0]
    wait_for_line(run / "slurm" / f"sbatch-{jid}.out", SIGNAL_AT)
    subprocess.run(["scancel", "--batch", "--signal=USR2", jid], check=True)
    assert wait_jobs([jid], timeout=240)[jid] == "COMPLETED"
    assert job_info(jid)["Restarts"] == "1"
    log = (run / "slurm" / f"sbatch-{jid}.out").read_text()
    assert "USR2 at" in log and "checkpoint written; requeueing job" in log and "medattn: done" in log
    assert "restart 1 on n1 n2" in log and "resuming at epoch" in log
    got = _stage_of_records(run, "global")
    assert [x["epoch"] for x in got] == [1, 2, 3] and all(x["world_size"] == 2 for x in got)
    _assert_same_epochs(got, _stage_of_records(ref_run, "global"))
    _assert_same_weights(run / "ckpt" / "global" / "last.pt", ref_run / "ckpt" / "global" / "last.pt")


def test_time_outs_requeue_until_max_timeouts_then_wait_reports_the_failure(chain, prep, tmp_path):
    """submitit counts a USR2 as a time-out when the job has used most of its time (with
    --time 1, always). --max-timeouts 1: the first time-out requeues the job, the second ends
    it; --wait reports the failure with the log's tail, and SLURM cancels the dependent job
    instead of leaving it pending. The checkpoint survives: resubmitting finishes the stage
    with the weights of the uninterrupted run."""
    ref_run, _ = chain
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medattn", "submit", *TWO_NODES, "--time", "1", "--signal-delay", "1",
           "--max-timeouts", "1", "--config", "demo", "--data", str(prep), "--out", str(run),
           "--stages", "global,local", "--wait", "--poll", "1", *BASE]
    waiter = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = run / "slurm"
        deadline = time.time() + 120
        while time.time() < deadline and not list(log.glob("*_0_log.out")):
            time.sleep(0.2)
        jid = sorted(log.glob("*_0_log.out"))[0].name.split("_")[0]
        wait_for_line(log / f"{jid}_0_log.out", SIGNAL_AT)
        subprocess.run(["scancel", "--signal=USR2", jid], check=True)  # time-out 1: requeued
        wait_for_line(log / f"{jid}_0_log.out", "resuming at epoch")
        subprocess.run(["scancel", "--signal=USR2", jid], check=True)  # time-out 2: the end
        out, err = waiter.communicate(timeout=240)
    finally:
        waiter.kill()
    assert waiter.returncode == 1, out + err
    g, loc = job_ids(out)[:2]
    assert f"global (job {g}): FAILED" in out and f"local (job {loc}): CANCELLED" in out
    assert "last lines of" in out and "Job not requeued because: timed-out too many times" in out
    text = (log / f"{g}_0_log.out").read_text()
    assert text.count("this job is timed-out") == 2 and "Requeued job" in text and "(0 remaining timeouts)" in text
    assert job_info(g)["Restarts"] == "1" and not queued(f"medattn:{run}")
    # the second time-out still left a complete checkpoint: a resubmit finishes the stage
    r = medattn("submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, "--stages", "global",
                "--wait", "--poll", "1", *BASE)
    assert r.returncode == 0, r.stdout + r.stderr
    got = _stage_of_records(run, "global")
    assert [x["epoch"] for x in got] == [1, 2, 3]
    _assert_same_weights(run / "ckpt" / "global" / "last.pt", ref_run / "ckpt" / "global" / "last.pt")


def _submit_in_process(capsys, *args):
    from medattn.cli import main

    rc = main(["submit", *map(str, args)])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("flags, needle", [
    (["--profile", "local", "--partition", "nosuch"], "--partition nosuch: no such partition (available: debug, urgent)"),
    (["--profile", "local", "--gpus-per-node", "1"], "--gpus-per-node 1: partition debug has no GPUs"),
    (["--profile", "local", "--nodes", "3"], "--nodes 3: partition debug has 2 node(s)"),
    (["--profile", "local", "--cpus-per-task", "8"], "nodes of partition debug have at most 2 CPUs"),
    (["--profile", "local", "--constraint", "nosuchfeature"], "SLURM refuses the job (sbatch --test-only)"),
    (["--profile", "local", "--nodes", "2", "stages.local.batch_size=15"],
     "stages.local.batch_size 15 is not divisible by the 2 processes"),
    (["--partition", "debug"], "is local to each node"),  # no --profile local: /tmp is refused
])
def test_wrong_settings_fail_at_submit_time(cluster, prep, tmp_path, capsys, flags, needle):
    run = tmp_path / "run"
    rc, cap = _submit_in_process(capsys, "--config", "demo", "--data", prep, "--out", run, *BASE, *flags)
    assert rc == 2 and needle in cap.err, cap.err
    assert not queued(f"medattn:{run}") and not (run / "slurm" / "jobs.jsonl").exists()


def test_failed_submission_cancels_the_submitted_part_of_the_chain(cluster, prep, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("MEDATTN_SUBMIT_FAULT_AT", "2")  # the 2nd sbatch of the chain fails
    rc, cap = _submit_in_process(capsys, "--profile", "local", "--config", "demo", "--data", prep, "--out", run, *BASE)
    assert rc == 2 and "submitting stage 'local' failed" in cap.err, cap.err
    (first,) = job_ids(cap.err.split("cancelled")[1])
    assert job_info(first)["JobState"] == "CANCELLED"
    assert not queued(f"medattn:{run}")
    # the run dir is not half-written: no config, no state, nothing that would block a resubmit
    assert not (run / "config.yaml").exists() and not (run / "slurm" / "jobs.jsonl").exists()


def test_a_running_chain_blocks_a_second_submit(cluster, prep, tmp_path, capsys):
    run = tmp_path / "run"
    hold = subprocess.run(["sbatch", "--parsable", "--hold", "-p", "debug", f"--comment=medattn:{run}",
                           "-o", "/dev/null", "--wrap", "true"], capture_output=True, text=True, check=True)
    jid = hold.stdout.strip()
    try:
        rc, cap = _submit_in_process(capsys, "--profile", "local", "--config", "demo", "--data", prep, "--out", run,
                                     *BASE)
        assert rc == 2 and f"already has jobs queued or running: {jid} (PENDING)" in cap.err, cap.err
    finally:
        subprocess.run(["scancel", jid])


def _cli(capsys, *args):
    from medattn.cli import main

    rc = main([*map(str, args)])
    return rc, capsys.readouterr()


def test_dry_run_prints_the_chain_and_submits_nothing(cluster, prep, tmp_path, capsys):
    run = tmp_path / "run"
    rc, cap = _cli(capsys, "submit", "--profile", "local", "--nodes", "2", "--mem", "1.5", "--time", "30",
                   "--signal-delay", "45", "--setup", "echo hello", "--config", "demo", "--data", prep, "--out", run,
                   "--dry-run", *BASE)
    assert rc == 0, cap.err
    scripts = cap.out.split("# ---- stage ")[1:]
    assert [s.split(":")[0] for s in scripts] == ["global", "local", "fusion"]
    g, loc, f = scripts
    for s, stage in zip(scripts, ["global", "local", "fusion"]):
        for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                     "#SBATCH --requeue", "#SBATCH --signal=USR2@45", "#SBATCH --time=30", "#SBATCH --mem=1536MB",
                     "#SBATCH --kill-on-invalid-dep=yes", f"#SBATCH --job-name=medattn-run-{stage}",
                     f"#SBATCH --comment=medattn:{run}", "export OMP_NUM_THREADS=1", "echo hello",
                     "--kill-on-bad-exit=1", "-m submitit.core._submit", f"--stages {stage}"]:
            assert line in s, (stage, line)
        assert "USR1" not in s and "wckey" not in s and "gpus" not in s
    assert "--dependency" not in g and "#SBATCH --dependency='afterok:<job id of global>'" in loc
    assert "afterok:<job id of local>" in f
    assert not queued(f"medattn:{run}") and not run.exists()


def test_sbatch_script_for_gpus_and_flags_over_profile(cluster, prep, tmp_path, capsys):
    """A GPU request on this GPU-less cluster is refused; flags override the profile; the script
    holds the recipe's pieces (one torchrun per node, c10d, USR2 trap, requeue, NCCL hints) and
    is valid bash."""
    run = tmp_path / "run"
    rc, cap = _cli(capsys, "sbatch", "--profile", "local", "--gpus-per-node", "2", "--config", "demo", "--data", prep,
                   "--out", run)
    assert rc == 2 and "partition debug has no GPUs" in cap.err
    script = tmp_path / "job.sbatch"
    rc, cap = _cli(capsys, "sbatch", "--profile", "local", "--nodes", "2", "--tasks-per-node", "2", "--cpus-per-task",
                   "1", "--partition", "urgent", "--time", "20", "--config", "demo", "--data", prep, "--out", run,
                   "--output", script, *BASE)
    assert rc == 0, cap.err
    text = script.read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --partition=urgent", "#SBATCH --time=20", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR2@30", f"#SBATCH --output={run}/slurm/sbatch-%j.out",
                 "--nproc-per-node=2", "--rdzv-backend=c10d", '--rdzv-endpoint="$head:$port"', "-m medattn train",
                 "trap on_usr2 USR2", "scontrol requeue", "# export NCCL_DEBUG=INFO", "# export NCCL_SOCKET_IFNAME=",
                 "# export NCCL_IB_HCA=", "# export NCCL_IB_DISABLE=1"]:
        assert line in text, line
    assert (run / "slurm").is_dir() and (script.stat().st_mode & 0o111)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_resubmitting_skips_done_stages(chain, prep, capsys):
    run, _ = chain
    rc, cap = _cli(capsys, "submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, *BASE)
    assert rc == 0 and "nothing to submit: stages global, local, fusion" in cap.out
    rc, cap = _cli(capsys, "submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, *BASE,
                   "stages.fusion.grad_clip=0.5")
    assert rc == 2 and "different config (stages.fusion.grad_clip: 0.0 -> 0.5)" in cap.err
    # more epochs continue the run: only the lengthened stage (and those after it) are submitted
    rc, cap = _cli(capsys, "submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, *BASE,
                   "stages.fusion.epochs=3", "--dry-run")
    assert rc == 0, cap.err
    assert [s.split(":")[0] for s in cap.out.split("# ---- stage ")[1:]] == ["fusion"]
    rc, cap = _cli(capsys, "submit", *TWO_NODES, "--config", "demo", "--data", prep, "--out", run, *BASE,
                   "stages.local.epochs=3", "--dry-run")
    assert rc == 0, cap.err
    assert [s.split(":")[0] for s in cap.out.split("# ---- stage ")[1:]] == ["local", "fusion"]
