"""medattn sweep without a Ray cluster: the space grammar and its checks, work-reuse analysis,
trial seeding, metrics following, persistent ASHA rungs, results, and the CLI failing on bad
spaces before anything starts."""
from __future__ import annotations

import json
import math
import os
import time

import pytest

from hpc.run import Run

from medattn import cli
from medattn.config import load_config, save_config
from medattn.errors import ConfigError
from prepfix import make_prepared
from sweeps import launch, reuse
from sweeps.space import build_space, parse_param, parse_scalar
from sweeps.trial import MetricsTail, TrialJob, metric_of

FOCAL = ["stages.local.loss=focal", "stages.fusion.loss=focal"]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n=32, size=32, seed=3)


def demo(*overrides):
    return load_config("demo", list(overrides))


# ------------------------------------------------------------------------------------ grammar
def test_parse_functions_and_scalars():
    p = parse_param("tau=uniform(0.5, 0.9)")
    assert (p.name, p.func, p.args) == ("tau", "uniform", [0.5, 0.9])
    assert p.candidates() == [0.5, math.nextafter(0.9, 0.5)]  # b itself is never sampled
    assert parse_param("stages.local.optimizer.lr=loguniform(1e-4,1e-1)").args == [1e-4, 0.1]
    q = parse_param("x.y=quniform(0.1,0.9,0.2)")
    assert q.args == [0.1, 0.9, 0.2] and q.candidates() == pytest.approx([0.2, 0.8])  # snapped inwards, as Ray does
    r = parse_param("x.y=randint(2,5)")
    assert r.args == [2, 5] and r.candidates() == [2, 4]  # upper bound excluded
    c = parse_param("lam=choice(0.25, 0.5, adaptive)")
    assert c.args == [0.25, 0.5, "adaptive"] and c.discrete
    assert parse_param("gamma=grid(0,1,2)").args == [0, 1, 2]
    assert parse_param("data.random_resized_scale=choice([0.08, 1.0], '[0.5, 1.0]')").args == \
        [[0.08, 1.0], "[0.5, 1.0]"]
    assert [parse_scalar(t) for t in ("3", "1e-4", "-2.5", "true", "adaptive", "'7'", "null")] == \
        [3, 1e-4, -2.5, True, "adaptive", "7", None]


@pytest.mark.parametrize("text, words", [
    ("tau=uniform(0.9,0.5)", ["tau", "empty range"]),
    ("tau=uniform(0.5,0.5)", ["tau", "empty range"]),
    ("gamma=choice()", ["gamma", "at least one value"]),
    ("x.y=loguniform(0,1)", ["x.y", "positive lower bound"]),
    ("x.y=quniform(0,1,0)", ["x.y", "step"]),
    ("x.y=randint(1.5,3)", ["x.y", "not an integer"]),
    ("tau=normal(0,1)", ["tau", "unknown function"]),
    ("tau=uniform(0.5)", ["tau", "takes 2 numbers"]),
    ("tau=uniform(a,0.9)", ["tau", "not a number"]),
    ("gamma=choice(1,2,1)", ["gamma", "appears twice"]),
    ("tau uniform(0.5,0.9)", ["expected NAME=FUNC(ARGS)"]),
])
def test_syntax_errors_name_the_parameter(text, words):
    with pytest.raises(ConfigError) as e:
        parse_param(text)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("specs, overrides, words", [
    (["foo=uniform(0,1)"], [], ["--space foo", "unknown parameter"]),
    (["agcnn.tua=uniform(0.5,0.9)"], [], ["--space agcnn.tua", "did you mean agcnn.tau"]),
    (["stages.foo.epochs=choice(1,2)"], [], ["--space stages.foo.epochs", "global, local, fusion"]),
    (["stages.local=choice(1,2)"], [], ["--space stages.local"]),
    (["gamma=choice(0,1,2,3)"], [], ["--space gamma", "no stage of this config uses focal loss"]),
    (["focal.alpha=uniform(0.2,0.8)"], [], ["--space focal.alpha", "focal"]),
    (["lam=choice(0.25,0.5,adaptive)"], [], ["--space lam", "'agcnn'", "gradcam_loss"]),
    (["dualattendmed.beta=uniform(0.01,0.1)"], [], ["--space dualattendmed.beta", "not used by method 'agcnn'"]),
    (["lungseg.threshold=uniform(0.3,0.7)"], [], ["--space lungseg.threshold", "not used by method 'agcnn'"]),
    (["gamma=choice(0,1,abc)"], FOCAL, ["--space gamma", "'abc'", "expected a number"]),
    (["tau=uniform(0.5,1.5)"], [], ["--space tau", "agcnn.tau", "(0, 1)"]),
    (["tau=choice(0.5,high)"], [], ["--space tau", "'high'"]),
    (["stages.*.optimizer.name=choice(sgd,lbfgs)"], [], ["--space stages.*.optimizer.name", "lbfgs"]),
    (["tau=uniform(0.5,0.9)", "tau=uniform(0.6,0.7)"], [], ["--space tau", "given twice"]),
    (["tau=uniform(0.5,0.9)", "agcnn.tau=uniform(0.6,0.7)"], [], ["--space agcnn.tau", "also sets"]),
])
def test_bad_spaces_against_the_config(specs, overrides, words):
    with pytest.raises(ConfigError) as e:
        build_space(specs, demo(*overrides))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_space_needs_a_stage_that_uses_it():
    cfg = demo("stages={global: {epochs: 1}}")
    cfg = load_config(None, data={**cfg.to_dict(), "stages": {"global": cfg.to_dict()["stages"]["global"]}})
    with pytest.raises(ConfigError, match="--space tau: agcnn.tau only acts in the local and fusion"):
        build_space(["tau=uniform(0.5,0.9)"], cfg)
    cls = load_config(None, data={**demo().to_dict(), "method": "classifier",
                                  "stages": {"s1": {"epochs": 1}}})
    with pytest.raises(ConfigError, match="--space tau: method 'classifier' has no attention threshold"):
        build_space(["tau=uniform(0.5,0.9)"], cls)


def test_aliases_map_to_config_keys():
    space = build_space(["tau=uniform(0.5,0.9)", "gamma=choice(0,1,2,3)"], demo(*FOCAL))
    assert space.keys() == ["agcnn.tau", "focal.gamma"]
    assert space.overrides({"tau": 0.6, "gamma": 2}) == [("agcnn.tau", 0.6), ("focal.gamma", 2)]
    # lam and adaptive (a gradcam_loss config; the method itself is checked by the CLI)
    gc = load_config(None, data={**demo().to_dict(), "method": "gradcam_loss", "stages": {"main": {"epochs": 1}}})
    lam = build_space(["lam=choice(0.25,0.5,adaptive)"], gc)
    p = lam.get("lam")
    assert p.overrides(0.25) == [("gradcam_loss.lam", 0.25), ("gradcam_loss.adaptive", False)]
    assert p.overrides("adaptive") == [("gradcam_loss.adaptive", True)]
    with pytest.raises(ConfigError, match="--space lam: 1.5 is not a weight"):
        build_space(["lam=choice(0.5,1.5)"], gc)
    # dualattendmed: tau is the fixed crop threshold theta, in training and evaluation
    dam = load_config(None, data={**demo().to_dict(), "method": "dualattendmed", "stages": {"main": {"epochs": 1}}})
    t = build_space(["tau=uniform(0.3,0.7)"], dam).get("tau")
    assert t.overrides(0.45) == [("dualattendmed.crop_theta", [0.45, 0.45]), ("dualattendmed.eval_crop_theta", 0.45)]
    job = TrialJob(out="/x", data="/d", base_config=dam.to_dict(), space=build_space(["tau=uniform(0.3,0.7)"], dam),
                   prefix=[], stages=["main"])
    c = job.trial_config({"tau": 0.45})
    assert c.dualattendmed.crop_theta == (0.45, 0.45) and c.dualattendmed.eval_crop_theta == 0.45


def test_method_check_runs_for_every_candidate(prep):
    from medattn.data.prepared import PreparedDataset
    from medattn.methods import DataSpec, create_method

    ds = PreparedDataset.open(prep)

    def check(c):
        create_method(c, DataSpec.from_dataset(ds, c))

    # AG-CNN accepts only bce/focal per stage: 'ce' is caught before any trial
    with pytest.raises(ConfigError, match="--space stages.local.loss: value 'ce'.*bce or focal"):
        build_space(["stages.local.loss=choice(bce,ce)"], demo(), method_check=check)
    # ... and a swept focal loss makes gamma meaningful
    s = build_space(["stages.local.loss=choice(bce,focal)", "gamma=choice(1,2)"], demo(), method_check=check)
    assert reuse.shared_prefix(demo(), s) == ["global"]


# ------------------------------------------------------------------------------------ reuse
@pytest.mark.parametrize("specs, overrides, prefix", [
    (["tau=uniform(0.5,0.9)", "gamma=choice(0,1,2,3)"], FOCAL, ["global"]),  # tau and gamma: local on
    (["gamma=choice(0,2)"], ["stages.global.loss=focal"], []),  # focal in the global stage: no sharing
    (["gamma=choice(0,2)"], ["stages.fusion.loss=focal"], ["global", "local"]),
    (["stages.local.optimizer.lr=loguniform(1e-4,1e-1)"], [], ["global"]),
    (["stages.fusion.optimizer.lr=loguniform(1e-4,1e-1)"], [], ["global", "local"]),
    (["stages.global.optimizer.lr=loguniform(1e-4,1e-1)"], [], []),
    (["stages.*.optimizer.lr=loguniform(1e-4,1e-1)"], [], []),
    (["agcnn.local_backbone=choice(resnet18,resnet34)"], [], []),  # the global stage builds the local branch
    (["model.drop_rate=uniform(0,0.5)"], [], []),
    (["seed=choice(0,1)"], [], []),
])
def test_shared_prefix(specs, overrides, prefix):
    cfg = demo(*overrides)
    assert reuse.shared_prefix(cfg, build_space(specs, cfg)) == prefix


def test_base_hash_covers_exactly_the_prefix(tmp_path):
    h = lambda *ov, data="/d": reuse.base_hash(demo(*ov), ["global"], data)  # noqa: E731
    ref = h()
    # settings of later stages, AG-CNN attention, focal (unused by global), logging: same base
    for ov in ("agcnn.tau=0.6", "stages.local.epochs=9", "stages.fusion.optimizer.lr=0.3", "focal.gamma=5",
               "stages.local.loss=focal", "runtime.log_every=3", "runtime.progress=none", "name=other"):
        assert h(ov) == ref, ov
    # anything that changes the global stage's weights: a new base
    for ov in ("stages.global.epochs=3", "seed=1", "model.backbone=resnet34", "data.image_size=96",
               "agcnn.local_backbone=resnet34", "runtime.precision=fp32"):
        assert h(ov) != ref, ov
    assert h(data="/other") != ref
    assert reuse.base_hash(demo("stages.global.loss=focal"), ["global"], "/d") != \
        reuse.base_hash(demo("stages.global.loss=focal", "focal.gamma=5"), ["global"], "/d")


def test_seed_trial_shares_the_base(tmp_path):
    base = tmp_path / "base"
    for s in ("global",):
        for kind in ("best", "last"):
            p = base / "ckpt" / s / f"{kind}.pt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"{s}-{kind}".encode())
    (base / "state.json").write_text(json.dumps({"stages": {"global": {"done": True, "best_metric": 0.8}}}))
    recs = [{"stage": "global", "epoch": 1}, {"stage": "global", "epoch": 2}, {"stage": "local", "epoch": 1}]
    (base / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = demo("agcnn.tau=0.55")
    run = tmp_path / "trials" / "t1"
    assert reuse.seed_trial(base, run, ["global"], cfg) is True
    for kind in ("best", "last"):
        a, b = base / "ckpt/global" / f"{kind}.pt", run / "ckpt/global" / f"{kind}.pt"
        assert os.stat(a).st_ino == os.stat(b).st_ino  # one copy on disk, shared by every trial
    st = json.loads((run / "state.json").read_text())["stages"]
    assert st == {"global": {"done": True, "best_metric": 0.8, "shared_from": str(base)}}
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == recs[:2]
    assert load_config(run / "config.yaml").agcnn.tau == 0.55
    assert Run(run).stages_done(["global"]) and not Run(run).stages_done(["global", "local"])
    assert reuse.seed_trial(base, run, ["global"], cfg) is False  # already seeded: left alone


# ------------------------------------------------------------------------------------ trials
def test_metrics_tail_and_metric(tmp_path):
    run = Run(tmp_path)
    path = run.metrics_path
    tail = MetricsTail(run, ["local", "fusion"])
    assert tail.new_records() == []
    g = {"stage": "global", "epoch": 1, "select/metric": "val/global/mean_auroc", "val/global/mean_auroc": 0.7}
    l1 = {"stage": "local", "epoch": 1, "select/metric": "val/local/mean_auroc", "val/local/mean_auroc": 0.61,
          "val/global/mean_auroc": 0.7}
    l2 = dict(l1, epoch=2, **{"val/local/mean_auroc": 0.65})
    path.write_text(json.dumps(g) + "\n" + json.dumps(l1) + "\n" + json.dumps(l2)[:20])  # l2 half written
    assert [r["epoch"] for r in tail.new_records()] == [1]
    time.sleep(0.01)
    path.write_text(json.dumps(g) + "\n" + json.dumps(l1) + "\n" + json.dumps(l2) + "\n")
    got = tail.new_records()
    assert [r["epoch"] for r in got] == [2] and metric_of(got[0]) == 0.65
    # select metric val/loss -> still the stage branch's mean AUROC; not evaluated -> NaN
    assert metric_of(dict(l1, **{"select/metric": "val/local/loss"})) == 0.61
    assert math.isnan(metric_of({"stage": "local", "epoch": 3, "select/metric": "val/local/mean_auroc"}))


def test_trainer_env_and_command(monkeypatch):
    base = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77", "RANK": "3",
            "MASTER_PORT": "1234", "PYTHONPATH": "/a", "PATH": "/bin"}
    env = launch.trainer_env(cpus=4, nproc=2, base=base)
    assert "SLURM_PROCID" not in env and "SLURM_NTASKS" not in env and "RANK" not in env
    assert "MASTER_PORT" not in env and env["SLURM_JOB_ID"] == "77"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(launch.PACKAGE_ROOT), "/a"]
    assert env["OMP_NUM_THREADS"] == "2"
    cmd = launch.train_command("/r/config.yaml", "/d", "/r", nproc=2, stages=["global"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-6:] == ["--data", "/d", "--out", "/r", "--stages", "global"]
    assert launch.train_command("c", "d", "o")[1:4] == ["-m", "medattn", "train"]


def test_persistent_asha_survives_a_restart(tmp_path):
    pytest.importorskip("ray.tune")
    from sweeps.asha import PersistentASHA

    class T:  # the scheduler only looks at trial_id
        def __init__(self, i):
            self.trial_id = i

    def fresh():
        s = PersistentASHA(str(tmp_path / "asha_state.pkl"), time_attr="training_iteration", max_t=4,
                           grace_period=1, reduction_factor=2)
        s.set_search_properties("mean_auroc", "max")
        return s

    s = fresh()
    a, b, c = T("a"), T("b"), T("c")
    for t in (a, b, c):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, a, {"training_iteration": 1, "mean_auroc": 0.8}) == "CONTINUE"
    assert s.on_trial_result(None, b, {"training_iteration": 1, "mean_auroc": 0.9}) == "CONTINUE"
    # rung 1 holds {0.8, 0.9}: the cutoff is their median 0.85
    assert s.on_trial_result(None, c, {"training_iteration": 1, "mean_auroc": 0.84}) == "STOP"
    assert json.loads((tmp_path / "asha_stopped.json").read_text()) == ["c"]
    # a new driver: the rungs come back from the file
    s2 = fresh()
    d = T("d")
    s2.on_trial_add(None, d)
    assert s2.on_trial_result(None, d, {"training_iteration": 1, "mean_auroc": 0.83}) == "STOP"
    assert s2.on_trial_result(None, a, {"training_iteration": 1, "mean_auroc": 0.8}) == "CONTINUE"  # already there
    assert s2.num_stopped == 2


def test_results_rank_completed_trials_first(tmp_path):
    from sweeps import results

    cfg = demo(*FOCAL)
    space = build_space(["tau=uniform(0.5,0.9)", "gamma=choice(0,1,2,3)"], cfg)

    def trial(tid, tau, gamma, recs, done):
        d = tmp_path / "trials" / tid
        d.mkdir(parents=True)
        save_config(load_config("demo", FOCAL + [f"agcnn.tau={tau}", f"focal.gamma={gamma}"]), d / "config.yaml")
        (d / "sweep_trial.json").write_text(json.dumps({"trial_id": tid, "params": {"tau": tau, "gamma": gamma},
                                                        "status": "running", "node_id": f"n-{tid}"}))
        rows = [{"stage": s, "epoch": e, "select/metric": f"val/{s}/mean_auroc", f"val/{s}/mean_auroc": v}
                for s, e, v in recs]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        st = {s: {"done": True} for s in done}
        (d / "state.json").write_text(json.dumps({"stages": st}))

    trial("a", 0.6, 1, [("local", 1, 0.7), ("local", 2, 0.75), ("fusion", 1, 0.72), ("fusion", 2, 0.71)],
          ["local", "fusion"])
    trial("b", 0.7, 2, [("local", 1, 0.9)], [])  # stopped by ASHA after one epoch, higher AUROC
    trial("c", 0.8, 3, [("local", 1, 0.5), ("local", 2, 0.55), ("fusion", 1, 0.66), ("fusion", 2, 0.69)],
          ["local", "fusion"])
    (tmp_path / "asha_stopped.json").write_text(json.dumps(["b"]))
    summary = results.write_all(tmp_path, space, ["local", "fusion"], "/data", None, log=lambda m: None)
    import pandas as pd

    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df["trial_id"]) == ["a", "c", "b"]
    assert list(df["state"]) == ["completed", "completed", "stopped"]  # ledger said running: files win
    assert list(df["best_auroc"]) == [0.72, 0.69, 0.9]  # best of the last stage each trial reached
    assert list(df["best_auroc_local"]) == [0.75, 0.55, 0.9]
    assert list(df["epochs"]) == [4, 4, 1]
    assert summary["best"]["trial_id"] == "a"
    best = (tmp_path / "best.yaml").read_text()
    assert best.startswith("# medattn sweep") and "best trial a (tau=0.6, gamma=1)" in best
    bc = load_config(tmp_path / "best.yaml")
    assert bc.agcnn.tau == 0.6 and bc.focal.gamma == 1.0 and bc.stages["local"].loss == "focal"
    for n in ("tau", "gamma"):
        assert (tmp_path / "plots" / f"auroc_vs_{n}.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("space, words", [
    ("tau=uniform(0.9,0.5)", ["--space tau", "empty range"]),
    ("gamma=choice(0,1,2,3)", ["--space gamma", "focal"]),
    ("lam=choice(0.25,0.5,adaptive)", ["--space lam"]),
    ("bogus=choice(1,2)", ["--space bogus", "unknown parameter"]),
])
def test_cli_bad_space_fails_before_anything_starts(prep, tmp_path, capsys, space, words):
    out = tmp_path / "sweep"
    t0 = time.time()
    rc = cli.main(["sweep", "--config", "demo", "--data", str(prep), "--out", str(out), "--space",
                   "tau=uniform(0.5,0.9)" if not space.startswith("tau") else "stages.local.epochs=choice(1,2)",
                   "--space", space, "--num-samples", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    for w in words:
        assert w in err
    assert not out.exists()  # no sweep dir, no trial, no Ray
    assert time.time() - t0 < 20


def test_cli_other_input_errors(prep, tmp_path, capsys):
    base = ["sweep", "--config", "demo", "--data", str(prep), "--out", str(tmp_path / "s"),
            "--space", "tau=uniform(0.5,0.9)"]
    cases = [
        (["--search", "grid"], "--space tau: --search grid needs choice"),
        (["--grace-period", "9", "stages.*.epochs=2"], "--grace-period 9"),
        (["--trial-resource", "slot"], "--trial-resource 'slot'"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial"),
        (["--data", str(tmp_path / "nope")], "prepared directory does not exist"),
    ]
    for extra, msg in cases:
        assert cli.main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert not (tmp_path / "s").exists()
    # a different sweep in the same directory is refused (resume = the same command)
    from sweeps.cli import check_spec

    (tmp_path / "s").mkdir()
    check_spec(tmp_path / "s", {"version": 1, "space": ["tau=uniform(0.5,0.9)"], "seed": 0})
    with pytest.raises(ConfigError, match="holds a different sweep \\(seed differ"):
        check_spec(tmp_path / "s", {"version": 1, "space": ["tau=uniform(0.5,0.9)"], "seed": 1})
    assert check_spec(tmp_path / "s", {"version": 1, "space": ["tau=uniform(0.5,0.9)"], "seed": 0}) is True
