"""Build a run report: read the run, draw the figures, write index.html and report.md.

The page answers three questions from itself alone: did the run learn (training curves, val
AUROC against chance), how does it compare with the papers (with the split and data caveats
up front), and where does the model look (overlays and localisation numbers).

Everything is written into a temporary directory beside the destination and swapped into place
at the end, so an interrupted report never leaves a half-written one.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medattn.boxes import records_xyxy
from medattn.data.labels import BOX_CLASSES, DISEASES
from medattn import published as P
from hpc.run import EvalDir, Run
from hpc.report.collect import RunArtifacts, collect, finite
from hpc.report.doc import (Banner, Bullets, Code, Document, Heading, Image, Para, Pre, Strong, Table, Text,
                                text)

CHANCE = 0.5


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    html: Path
    markdown: Path
    figures: list[Path]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------
def fmt(v: Any, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if finite(v) else "n/a"


def fmt_ci(v: Any, ci: Any) -> str:
    if not finite(v):
        return "n/a"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(c) for c in ci):
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{v:.3f}"


def fmt_s(seconds: Any) -> str:
    if not finite(seconds):
        return "n/a"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _rel(path: Path) -> str:
    return path.as_posix()


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def build_report(run: str | Path, split: str = "test", samples: int = 12, out: str | Path | None = None,
                 data: str | None = None, eval_dir: str | Path | None = None, device: str = "cpu",
                 log=print) -> ReportResult:
    """Write RUN/report/index.html (self-contained) and RUN/report/report.md (+ figures/).

    Args:
        run: the run directory.
        split: the evaluated split to report (its RUN/eval* metrics.json).
        samples: how many test images get heat-map overlays (0 = none).
        out: the output directory (default RUN/report, or RUN/report_<split> for other splits).
        data: the prepared directory (default: the one the run was trained on).
        eval_dir: the evaluation to show (default RUN/eval, or RUN/eval_<split>; ``medattn eval
            --out-dir`` writes elsewhere).
        device: torch device for the overlay inference.
        log: where progress lines go.

    Raises:
        DataError: ``run`` is not a run directory.
    """
    art = collect(run, split=split, data=data, eval_dir=eval_dir)
    dest = Path(out) if out else Run(run).report_dir(split)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        figdir = tmp / "figures"
        figdir.mkdir()
        doc = Document(title=f"medattn run report: {art.root.resolve().name}")
        builder = _Builder(art, doc, tmp, figdir, samples, device, log, data=data, eval_dir=eval_dir)
        builder.build()
        from hpc.report.html import render_html
        from hpc.report.md import render_markdown

        (tmp / "index.html").write_text(render_html(doc, tmp), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(doc), encoding="utf-8")
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    figs = sorted((dest / "figures").glob("*.png"))
    return ReportResult(dest / "index.html", dest / "report.md", figs, art.notes)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` by ``tmp`` with renames only (the old report stays whole until then)."""
    from medattn.fileio import publish

    publish(tmp, dest)


class _Builder:
    def __init__(self, art: RunArtifacts, doc: Document, base: Path, figdir: Path, samples: int, device: str,
                 log, data: str | None = None, eval_dir: str | Path | None = None) -> None:
        self.art, self.doc, self.base, self.figdir = art, doc, base, figdir
        self.samples, self.device, self.log = samples, device, log
        self.data_arg, self.eval_dir_arg = data, eval_dir
        self.m = art.metrics
        self.notes = list(art.notes)

    # ------------------------------------------------------------------ helpers
    def add(self, *blocks) -> None:
        self.doc.add(*blocks)

    def figure(self, name: str, fig_fn, alt: str, caption: str | Text) -> bool:
        """Draw a figure with ``fig_fn(path)``; a failure becomes a note, never a crash."""
        path = self.figdir / name
        try:
            fig_fn(path)
        except Exception as e:  # a figure must not take the whole report down
            self.add(Para(Text.of(f"({alt}: could not be drawn: {type(e).__name__}: {e})")))
            return False
        self.add(Image(_rel(path.relative_to(self.base)), alt, text(caption)))
        return True

    @property
    def branches(self) -> list[str]:
        return list((self.m or {}).get("auroc", {}).keys())

    @property
    def classes(self) -> list[str]:
        return self.art.eval_labels

    @property
    def paper(self) -> P.PublishedResults:
        """What the run's method's paper reported (``Method.published``; nothing for an unknown method)."""
        from medattn.errors import ConfigError
        from medattn.methods import method_class

        try:
            return method_class(self.art.method).published
        except ConfigError:
            return P.PublishedResults()

    @property
    def columns(self) -> tuple[P.PublishedAUROC, ...]:
        """The published AUROC columns beside the run: its method's paper's, then the dataset's references."""
        return self.paper.auroc + P.REFERENCE_AUROC

    @property
    def selections(self) -> dict[str, dict[str, Any]]:
        """Per stage: its starting weights and the epoch it kept (hpc.run.stage_selections), from
        the run's state and records, with what eval recorded of each stage's start."""
        from hpc.run import stage_selections

        if not hasattr(self, "_selections"):
            sel = stage_selections(Run(self.art.root), self.art.stage_names, None)
            # The state is the truth on which epoch was kept; eval recorded what the stage started from.
            for s, rec in ((self.m or {}).get("stages") or {}).items():
                if s in sel and "start" in rec:
                    sel[s].update({k: v for k, v in rec.items() if k not in sel[s] or k == "start"})
                    if sel[s].get("best_epoch") == 0:
                        sel[s]["kept"] = f"{rec['start']}, kept: no {s} epoch beat it on validation"
            self._selections = sel
        return self._selections

    def _mean_over(self) -> dict[str, Any]:
        """Which evaluated classes the mean AUROC averages (eval's ``mean_over``; else all of them)."""
        mo = (self.m or {}).get("mean_over")
        if isinstance(mo, dict) and "n" in mo:
            return mo
        return {"n": len(self.classes), "of": len(self.classes), "classes": list(self.classes), "excluded": {}}

    def _mean_over_text(self) -> str:
        """"13 of 14 classes (Hernia has no positives in this split)" or "these 4 classes"."""
        mo = self._mean_over()
        if not mo.get("excluded"):
            return f"these {mo['n']} classes"
        why = "; ".join(f"{c} has {r}" for c, r in mo["excluded"].items())
        return f"{mo['n']} of {mo['of']} classes ({why})"

    def _mean_interval_note(self) -> str:
        """Name the "too few" classes whose resamples the mean's interval still averages."""
        few = sorted({c for v in ((self.m or {}).get("auroc_ci_too_few") or {}).values() for c in v})
        if not few:
            return ""
        return (f" The mean's 95% interval averages every class of the mean in each resample, including the "
                f"'too few' ones ({', '.join(few)}), whose own intervals are not given.")

    def _kept_sentence(self, stage: str) -> str:
        """The evaluated weights of ``stage`` in words; never credits an epoch that lost."""
        e = self.selections.get(stage) or {}
        if e.get("best_epoch") == 0 and e.get("best_metric") is not None:
            how = "".join(f" ({k}={v})" for k, v in (e.get("chosen_by") or {}).items())
            return (f"The {stage} output is the {e.get('start', 'starting weights')}{how} it started from, kept: "
                    f"no {stage} epoch beat it on validation, so no {stage} epoch is credited.")
        if isinstance(e.get("best_epoch"), int) and e.get("best_metric") is not None:
            return f"Its weights are those of {stage} epoch {e['best_epoch']} (best on validation)."
        return ""

    def _eval_cmd(self) -> str:
        cmd = f"medattn eval --run {self.art.root} --split {self.art.split}"
        if self.data_arg:
            cmd += f" --data {self.data_arg}"
        if self.eval_dir_arg:
            cmd += f" --out-dir {self.eval_dir_arg}"
        return cmd

    # ------------------------------------------------------------------ sections
    def build(self) -> None:
        self.header()
        self.glance()
        self.classification()
        from hpc.report.clinical import add_sections  # calibration, operating points, subgroups, external

        add_sections(self)
        self.training()
        self.localisation()
        self.overlays()
        self.throughput()
        self.config_and_provenance()
        self.sources()

    def header(self) -> None:
        a, m = self.art, self.m
        self.add(Heading(1, self.doc.title))
        stages = a.stage_names
        done = a.done_stages
        parts: list[Any] = [f"Run ", Code(str(a.root.resolve())), f": method {a.method}, backbone {a.backbone}; "
                            f"stages {' → '.join(stages) or '?'} (finished: {', '.join(done) or 'none'}). "]
        if m:
            parts += [f"Evaluated on the ", Strong(f"{m.get('split', a.split)} split"), " of the ",
                      Strong(f"'{a.split_kind or '?'}' split"),
                      f" ({m.get('n_images', '?')} images), model of stage {m.get('stage', '?')} "
                      f"({Path(str(m.get('checkpoint', '?'))).name}). "]
            sp = m.get("split_provenance") or {}
            if sp.get("hash"):
                parts.append(f"Split '{sp.get('name')}', seed {sp.get('seed')}, assignment hash {sp['hash']}"
                             + ("" if not sp.get("trained_on") else
                                " (the split the model was trained on)" if sp.get("same_as_training") else
                                f"; the model was trained on another split ('{sp['trained_on'].get('name')}', hash "
                                f"{sp['trained_on'].get('hash')}): its test images may be training images")
                             + ". ")
            if Path(str(m.get("checkpoint", ""))).stem == "best":
                kept = self._kept_sentence(str(m.get("stage")))
                parts += [kept + " "] if kept else []
        parts.append(f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
        self.add(Para(Text(parts)))
        self.data_banner()
        sp = (m or {}).get("split_provenance") or {}
        if sp.get("same_as_training") is False:
            self.add(Banner("danger", "Evaluated on another split than the model was trained on.", Text.of(
                f"Evaluated split '{sp.get('name')}' (hash {sp.get('hash')}), trained on '"
                f"{(sp.get('trained_on') or {}).get('name')}' (hash {(sp.get('trained_on') or {}).get('hash')}); "
                "eval ran with --allow-split-mismatch. Test images may be training images: these numbers "
                "overstate the model.")))
        self.split_banner()
        self.eval_banners()

    def data_banner(self) -> None:
        a = self.art
        kind = a.data_kind
        src = a.source
        if kind == "synthetic":
            self.add(Banner("danger", "Synthetic data — do not compare with papers.", Text.of(
                f"This run was trained and evaluated on synthetic images (prepared data {a.data_dir}, source kind "
                f"'{src.get('kind', '?')}'), not on NIH ChestX-ray14. Its AUROC and localisation numbers show "
                "whether the pipeline works end to end; they say nothing about chest X-ray diagnosis. The "
                "published columns below are printed for orientation only.")))
        elif kind == "other":
            self.add(Banner("warn", "Not ChestX-ray14.", Text.of(
                f"The prepared data ({a.data_dir}) come from source kind '{src.get('kind')}', not NIH "
                "ChestX-ray14: the published ChestX-ray14 numbers below do not apply.")))
        elif kind == "unknown":
            self.add(Banner("warn", "Data source unknown.", Text.of(
                f"The prepared data ({a.data_dir or 'not recorded'}) are not available here, so this report cannot "
                "tell whether the run used real ChestX-ray14 images or synthetic ones. Pass ",
                Code("--data PREP"), " to say.")))
        else:
            self.add(Banner("info", "Data: NIH ChestX-ray14.", Text.of(
                f"Prepared from {src.get('root', '?')} (metadata {src.get('metadata', '?')}, variant "
                f"{src.get('variant', '?')}).")))

    def split_banner(self) -> None:
        """The run's split protocol, and which published columns share it (only those are called
        comparable; medattn/published.py PROTOCOLS)."""
        a = self.art
        kind = a.split_kind
        info = a.dataset_info or {}
        seed = info.get("split_seed")
        if kind is None:
            self.add(Banner("warn", "Split unknown.", Text.of(
                "Neither the evaluation nor the prepared data say which split this run used, so no published "
                "column below is comparable with it.")))
            return
        proto = P.run_protocol(kind)
        what = {"chexnet": "the CheXNet re-implementation's 70/10/20 patient split (arnoweng/CheXNet files)",
                "random": f"a random 70/10/20 patient split (seed {seed})",
                "image-random": f"a random 70/10/20 split by image (seed {seed})",
                "official": "the official train_val/test lists"}.get(kind, f"the '{kind}' split")
        sp = info.get("split_protocol") or {}
        leak = ""
        if proto == "image-random":
            leak = (" It leaks patients: a patient's images can be in training and in test"
                    + (f" ({sp['patients_crossing']} of {sp['patients']} patients of the prepared data have images "
                       "in more than one part)" if "patients_crossing" in sp else "")
                    + ", which raises test AUROC.")
        elif proto is not None:
            leak = " No patient has images in two parts."
        same = self._comparable_columns()
        cols = "; ".join(f"{c.name}: {P.PROTOCOLS[c.protocol]}" for c in self.columns)
        by_reading = [c for c in self.columns if P.reading_matches(kind, c)]
        reading = ("" if not by_reading else
                   " Same split as medattn's reading of " + ", ".join(c.name for c in by_reading)
                   + " (" + "; ".join(f"{c.name}: {c.reading_note}" for c in by_reading)
                   + "): a comparison rests on that reading, not on the source.")
        if same:
            names = ", ".join(c.name for c in same)
            verdict = (f"Comparable (same split protocol, different test images): {names}."
                       if a.data_kind == "nih" else
                       f"Same split protocol as {names}, but the data are not (known to be) ChestX-ray14, so "
                       "nothing here is comparable with them.")
            self.add(Banner("info", f"Split: {kind} — same protocol as {names}.", Text.of(
                f"This run uses {what}.{leak} {verdict} Protocols of the published columns: {cols}.")))
        else:
            self.add(Banner("warn", f"Split: {kind} — not comparable with the papers below.", Text.of(
                f"This run uses {what}.{leak} No published column below states this protocol ({cols}).{reading} "
                "official-split results run about 0.80–0.83 mean AUROC for single models (chestxray14.md §4). "
                + ("Official-split references are listed under Classification." if kind == "official" else ""))))

    def _comparable_columns(self) -> list[Any]:
        """The published columns whose split protocol is this run's (data and classes aside)."""
        return [c for c in self.columns if P.protocol_matches(self.art.split_kind, c.protocol)]

    def eval_banners(self) -> None:
        a, m = self.art, self.m
        not_done = [s for s in a.stage_names if s not in a.done_stages]
        if not_done:
            self.add(Banner("info", "Run not finished.", Text.of(
                f"Stages not finished: {', '.join(not_done)}. This report shows what exists so far.")))
        if m is None:
            self.add(Banner("warn", "Not evaluated yet.", Text.of(
                f"{EvalDir(a.eval_dir).metrics_path} does not exist, so there are no test AUROC, ROC curves or "
                "localisation numbers. Run ", Code(self._eval_cmd()), " and then this report again (or ",
                Code(f"medattn report --run {a.root} --eval"
                     + (f" --split {a.split}" if a.split != "test" else "")), ", which evaluates first).")))
            return
        last = a.last_done_stage
        if last and m.get("stage") and m["stage"] != last:
            self.add(Banner("warn", "The evaluation is out of date.", Text.of(
                f"It evaluated stage '{m['stage']}', but stage '{last}' has finished since. Run ",
                Code(self._eval_cmd()), " again (or report with --eval).")))
        cls = self.classes
        mo = self._mean_over()
        if mo.get("excluded"):
            self.add(Banner("warn", f"Mean AUROC over {self._mean_over_text()}.", Text.of(
                "A class without positives (or without negatives) in the evaluated split has no AUROC, so the "
                f"mean averages the other {mo['n']}: {', '.join(mo['classes'])}.")))
        if cls and list(cls) != list(DISEASES):
            self.add(Banner("warn", f"Mean AUROC over {len(cls)} classes, not the 14 diseases.", Text.of(
                f"This run's evaluated classes are {', '.join(cls)}; published means average the 14 ChestX-ray14 "
                "diseases. The tables give the published means over the same classes for a like-for-like row.")))

    # ------------------------------------------------------------------ at a glance
    def glance(self) -> None:
        self.add(Heading(2, "At a glance", "glance"))
        rows = [["Did the run learn?", self._learned_text()],
                ["How does it compare with the papers?", self._compare_text()],
                ["Where does the model look?", self._where_text()]]
        self.add(Table(["question", "answer"], rows))

    def _stage_curve(self, stage: str) -> tuple[list[int], list[float], list[float]]:
        recs = [r for r in self.art.records if r.get("stage") == stage]
        ep, val, loss = [], [], []
        for r in recs:
            key = r.get("select/metric")
            v = r.get(key) if isinstance(key, str) else None
            ep.append(int(r.get("epoch", 0)))
            val.append(float(v) if finite(v) else math.nan)
            loss.append(float(r["train/loss"]) if finite(r.get("train/loss")) else math.nan)
        return ep, val, loss

    def _learned_text(self) -> str:
        out = []
        for s in self.art.stage_names:
            ep, val, loss = self._stage_curve(s)
            if not ep:
                continue
            good = [(e, v) for e, v in zip(ep, val) if not math.isnan(v)]
            part = f"{s}: "
            sel = self.selections.get(s) or {}
            if good and sel.get("best_epoch") == 0 and finite(sel.get("best_metric")):
                bv = float(sel["best_metric"])
                trained = [v for e, v in good if e > 0]
                part += (f"val mean AUROC {bv:.3f} at the start (epoch 0, the {sel.get('start', 'starting weights')}); "
                         f"no {s} epoch beat it" + (f" (best trained epoch {max(trained):.3f})" if trained else "")
                         + f", so the {sel.get('start', 'starting weights')} was kept, {bv - CHANCE:+.3f} over chance (0.5)")
            elif good:
                be, bv = max(good, key=lambda t: t[1])
                if isinstance(sel.get("best_epoch"), int) and finite(sel.get("best_metric")):
                    be, bv = sel["best_epoch"], float(sel["best_metric"])
                part += (f"val mean AUROC {good[0][1]:.3f} (epoch {good[0][0]}) → best {bv:.3f} (epoch {be}), "
                         f"{bv - CHANCE:+.3f} over chance (0.5)")
            else:
                part += "no validation AUROC recorded"
            fl = [v for v in loss if not math.isnan(v)]
            if len(fl) >= 2:
                part += f"; train loss {fl[0]:.3f} → {fl[-1]:.3f}"
            out.append(part)
        if not out:
            out.append(f"no epoch has been recorded yet ({Run(self.art.root).metrics_path.name} is empty or missing)")
        if self.m:
            b = self.branches[-1] if self.branches else None
            if b:
                mean = self.m["auroc"][b].get("mean")
                ci = (self.m.get("auroc_ci") or {}).get(b, {}).get("mean")
                verdict = ""
                if isinstance(ci, list) and len(ci) == 2 and all(finite(c) for c in ci):
                    verdict = (" — the 95% interval lies above 0.5: better than chance" if ci[0] > CHANCE else
                               " — the 95% interval includes 0.5: not distinguishable from chance")
                elif finite(mean):
                    verdict = " (no bootstrap interval)"
                out.append(f"test ({b} branch): mean AUROC {fmt_ci(mean, ci)}{verdict}")
        return ". ".join(out) + "."

    def _compare_text(self) -> str:
        if not self.m or not self.branches:
            return "Not evaluated yet (see above)."
        b = self.branches[-1]
        mean = self.m["auroc"][b].get("mean")
        cls = self.classes
        same = [f"{c.name} {fmt(P.published_mean(c, cls))}" for c in self.columns[:3]]
        own = [f"{c.name} {c.reported_mean():.3f}" for c in self.paper.auroc]
        txt = (f"{b} mean AUROC {fmt(mean)} over {self._mean_over_text()}; published over the same classes: "
               + ", ".join(same) + (f" ({self.paper.name} reported means: {', '.join(own)}, over 14 diseases)"
                                    if own else "") + ".")
        caveats = []
        if self.art.data_kind == "synthetic":
            caveats.append("the data are synthetic, so this is no comparison at all")
        elif self.art.data_kind != "nih":
            caveats.append("the data are not (known to be) ChestX-ray14")
        kind = self.art.split_kind
        same = self._comparable_columns()
        if not same:
            caveats.append(f"the split is '{kind}' ({P.PROTOCOLS.get(P.run_protocol(kind) or '', 'unknown protocol')}), "
                           "a protocol none of these papers used")
        if list(cls) != list(DISEASES):
            caveats.append(f"the mean is over {len(cls)} classes, not 14")
        if caveats:
            txt += " Not comparable: " + "; ".join(caveats) + "."
        else:
            others = [c.name for c in self.columns if c not in same]
            txt += (f" Comparable (same split protocol, {P.PROTOCOLS[same[0].protocol]}): "
                    f"{', '.join(c.name for c in same)}"
                    + (f"; not comparable (other protocol): {', '.join(others)}" if others else "") + ".")
        return txt

    def _where_text(self) -> str:
        loc = (self.m or {}).get("localization")
        if not self.m:
            return "Not evaluated yet (see above)."
        if not loc:
            return ("No localisation numbers: the evaluated split has no ground-truth boxes, or the method gives "
                    "no attention box. See the overlays section for heat maps.")
        ov = loc.get("overall", {})
        acc = ov.get("acc_iobb", {})
        macro = ov.get("macro_acc_iobb", {})
        wang = np.mean([v[0.1] for v in P.WANG_TIOBB.values()])
        return (f"Attention box vs {loc.get('n_boxes')} ground-truth boxes on {loc.get('n_images')} images: mean IoBB "
                f"{fmt(ov.get('iobb_mean'))}, mean IoU {fmt(ov.get('iou_mean'))}; correct at T(IoBB) > 0.1: "
                f"{fmt(acc.get('0.1'))} of boxes ({fmt(macro.get('0.1'))} averaged over classes; Wang et al. 2017: "
                f"{wang:.3f} averaged over their 8 classes). Heat-map overlays are in the overlays section.")

    # ------------------------------------------------------------------ classification
    def classification(self) -> None:
        self.add(Heading(2, "Classification (AUROC)", "auroc"))
        m = self.m
        if not m:
            self.add(Para(Text.of("No evaluation yet: run ", Code(self._eval_cmd()), ".")))
            return
        branches = self.branches
        ci = m.get("auroc_ci") or {}
        nboot = m.get("bootstrap")
        self.add(Para(Text.of(
            f"Per-class AUROC on the {m.get('split')} split ('{self.art.split_kind}' split, "
            f"{m.get('n_images')} images) "
            f"for each branch of the model of stage '{m.get('stage')}'"
            + (f", with 95% intervals from a {m.get('bootstrap_method', 'image-level percentile bootstrap')} "
               f"({nboot} resamples" + (f" of {m['bootstrap_units']} patients, a patient's images resampled together"
                                        if m.get("bootstrap_units") and "patient" in str(m.get("bootstrap_method"))
                                        else "") + ")" if nboot else
               " (no bootstrap intervals: the evaluation ran with --bootstrap 0)")
            + (f"; 'too few' = fewer than {m.get('bootstrap_min_positives')} positive patients, no interval"
               if m.get("bootstrap_min_positives") else "")
            + ". Published columns and their split protocols: "
            + "; ".join(f"{c.name} ({P.PROTOCOLS[c.protocol]}"
                        + (f", read as {P.PROTOCOLS[c.reading]}" if c.reading else "") + ": "
                        + ("comparable" if c in self._comparable_columns() and self.art.data_kind == "nih"
                           else "not comparable") + ")" for c in self.columns)
            + " (see Sources).")))
        few = m.get("auroc_ci_too_few") or {}
        npos = self._positives()
        header = ["class", "n+"] + [f"{b} (this run)" for b in branches] + [c.name for c in self.columns]
        rows = []
        for c in self.classes:
            row = [c, str(npos.get(c, "?"))]
            for b in branches:
                cell = fmt_ci(m["auroc"][b].get(c), ci.get(b, {}).get(c))
                if c in few.get(b, ()) and finite(m["auroc"][b].get(c)):
                    cell += " (too few)"
                row.append(cell)
            row += [fmt(col.per_class.get(c)) if c in col.per_class else "—" for col in self.columns]
            rows.append(row)
        mean_row = [f"mean over {self._mean_over_text()}", ""]
        mean_row += [fmt_ci(m["auroc"][b].get("mean"), ci.get(b, {}).get("mean")) for b in branches]
        mean_row += [fmt(P.published_mean(col, self.classes)) for col in self.columns]
        rows.append(mean_row)
        strong = {len(rows) - 1}
        if list(self.classes) != list(DISEASES):
            rows.append(["mean as published (14 diseases)", ""] + ["—"] * len(branches)
                        + [fmt(col.reported_mean()) for col in self.columns])
        nb = len(branches)
        self.add(Table(header, rows, numeric=set(range(1, 2 + nb + len(self.columns))), strong_rows=strong,
                       caption="n+ = positive images of the class in the evaluated split. A class without positives "
                               "has no AUROC (n/a) and is left out of the mean."
                               + "".join(f" {c.name}: {c.source}." for c in self.paper.auroc)
                               + self._mean_interval_note()))
        # Branch means beside the paper's (a method with several output branches says them).
        paper = self.paper
        if paper.branch_means:
            self.add(Heading(3, f"Branch means beside {paper.name} {paper.table}"))
            rows = []
            table_branches = list(next(iter(paper.branch_means.values())))
            for b in table_branches:
                run_v = fmt_ci(m["auroc"][b].get("mean"), ci.get(b, {}).get("mean")) if b in m["auroc"] else "—"
                rows.append([b, run_v] + [fmt(paper.branch_means[k].get(b)) for k in paper.branch_means])
            last = table_branches[-1]
            self.add(Table(["branch", f"this run ({len(self.classes)} classes)"]
                           + [f"{paper.name} {k} (14 diseases)" for k in paper.branch_means], rows,
                           numeric=set(range(1, 2 + len(paper.branch_means))),
                           caption=f"{paper.source}; {P.PROTOCOLS[paper.protocol]}; this run: "
                           + (f"'{self.art.split_kind}' split, comparable protocol."
                              if P.protocol_matches(self.art.split_kind, paper.protocol)
                              and self.art.data_kind == "nih" else
                              f"'{self.art.split_kind}' split, not comparable (the paper does not state image or "
                              f"patient, or other data)." if paper.protocol == "unstated" else
                              f"'{self.art.split_kind}' split, not comparable (other protocol or data).")
                           + (" " + self._kept_sentence(last) + f" Its column is therefore the {table_branches[0]} "
                              "column's model, up to float rounding."
                              if (self.selections.get(last) or {}).get("best_epoch") == 0
                              and (self.selections.get(last) or {}).get("same_as_branch") == table_branches[0]
                              and last in m["auroc"] else "")))
        self._binary_table()
        if self.art.split_kind == "official":
            self.add(Heading(3, "Official-split references"))
            self.add(Table(["work", "model", "mean AUROC (14)"],
                           [[r.work, r.model, f"{r.mean:.3f}"] for r in P.OFFICIAL_SPLIT_MEANS], numeric={2},
                           caption=f"Comparable with a run on the official split. Source: {P.OFFICIAL_SPLIT_SOURCE}."))
        self.roc_curves()

    def _binary_table(self) -> None:
        """Seed 002's binary-task table (2-class single-label runs): AUC, and sensitivity,
        specificity and accuracy at 0.5 and at the Youden threshold, per branch."""
        binary = (self.m or {}).get("binary")
        if not binary:
            return
        pos = binary.get("positive_class")
        self.add(Heading(3, f"Binary task: {pos} vs the rest"))
        rows = []
        for branch, rep in binary.items():
            if branch == "positive_class":
                continue
            for name, op in (("0.5", rep.get("at_threshold")), ("Youden", rep.get("at_youden"))):
                op = op or {}
                rows.append([branch, fmt(rep.get("auroc")), name, fmt(op.get("threshold")), fmt(op.get("sensitivity")),
                             fmt(op.get("specificity")), fmt(op.get("accuracy"))])
        self.add(Table(["branch", "AUC", "operating point", "threshold", "sensitivity", "specificity", "accuracy"],
                       rows, numeric={1, 3, 4, 5, 6},
                       caption=f"The table seed 002 reports, on the {self.m.get('split')} split; the Youden "
                               "threshold maximises sensitivity + specificity - 1 on this split itself, so "
                               "its figures are optimistic."))

    def _positives(self) -> dict[str, int]:
        pr = self.art.preds
        if pr is None or "branch" not in pr.columns:
            return {}
        first = pr[pr["branch"] == pr["branch"].iloc[0]] if len(pr) else pr
        return {c: int(first[f"y_{c}"].sum()) for c in self.classes if f"y_{c}" in first.columns}

    def roc_curves(self) -> None:
        from medattn import figures

        pr = self.art.preds
        self.add(Heading(3, "ROC curves"))
        if pr is None:
            self.add(Para(Text.of(f"No ROC curves: {EvalDir(self.art.eval_dir).preds_path} is missing.")))
            return
        names = list(self.m.get("label_names") or [])
        ci_all = self.m.get("auroc_ci") or {}
        # The model's output branch (AG-CNN: fusion); the table above has every branch's numbers.
        for b in self.branches[-1:]:
            sub = pr[pr["branch"] == b]
            pcols, ycols = [f"p_{n}" for n in names], [f"y_{n}" for n in names]
            if sub.empty or any(c not in sub.columns for c in pcols + ycols):
                self.add(Para(Text.of(f"No ROC curves for branch {b}: {EvalDir(self.art.eval_dir).preds_path.name} "
                                      "lacks its rows or columns.")))
                continue
            probs, ys = sub[pcols].to_numpy(np.float64), sub[ycols].to_numpy(np.int64)
            ci = {k: tuple(v) for k, v in ci_all.get(b, {}).items() if k != "mean" and isinstance(v, list)}
            self.figure(f"roc_{b}.png", lambda p, probs=probs, ys=ys, b=b, ci=ci: figures.plot_roc_curves(
                probs, ys, names, self.classes, title=f"ROC, {b} branch", ci=ci, path=p, dpi=110),
                f"ROC curves, {b} branch",
                f"ROC per class of the {b} branch (the model's output; the table above has every branch), "
                f"{self.m.get('split')} split; dashed = chance; n+ = positives; brackets = bootstrap 95% interval.")

    # ------------------------------------------------------------------ training
    def training(self) -> None:
        from medattn import figures

        self.add(Heading(2, "Training", "training"))
        recs = self.art.records
        if not recs:
            self.add(Para(Text.of("No epoch recorded yet: ", Code(str(Run(self.art.root).metrics_path)),
                                  " is missing or empty.")))
            return
        # The selection metric of each stage (AG-CNN: the stage's own branch) as one series.
        series = []
        for r in recs:
            r2 = dict(r)
            key = r.get("select/metric")
            if isinstance(key, str) and finite(r.get(key)):
                r2["val/selected_auroc"] = r[key]
            series.append(r2)

        def draw(path):
            fig = figures.plot_training_curves(series, loss_keys=("train/loss",), metric_key="val/selected_auroc",
                                               title="Training: loss and validation mean AUROC per epoch")
            from matplotlib.ticker import MaxNLocator

            ax = fig.axes[1]
            ax.axhline(CHANCE, ls="--", lw=1.0, color=figures.CHANCE_COLOR, label="chance (0.5)")
            ax.set_title("validation mean AUROC (★ best per stage)")
            ax.set_ylabel("mean AUROC of the stage's branch")
            ax.legend(fontsize=8)
            for a in fig.axes[:2]:
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
            figures.save_figure(fig, path, dpi=110)

        self.figure("training.png", draw, "training curves", Text.of(
            "Left: mean training loss per epoch. Right: validation mean AUROC of the branch each stage trains "
            f"({', then '.join(self.art.stage_names)}); ★ = best epoch (its checkpoint feeds the next stage and "
            "the evaluation); dashed = chance. Each stage counts epochs from 1."))
        rows = []
        for s in self.art.stage_names:
            ep, val, loss = self._stage_curve(s)
            planned = ((self.art.config.get("stages") or {}).get(s) or {}).get("epochs", "?")
            st = self.art.state.get("stages", {}).get(s, {})
            good = [(e, v) for e, v in zip(ep, val) if not math.isnan(v)]
            best = max(good, key=lambda t: t[1]) if good else None
            sel = self.selections.get(s) or {}
            if isinstance(sel.get("best_epoch"), int) and finite(sel.get("best_metric")):
                best = (sel["best_epoch"], float(sel["best_metric"]))  # the kept epoch, as selected
            best_cell = "n/a" if best is None else (
                f"{best[1]:.3f} (epoch 0: {sel.get('start', 'starting weights')} kept)" if best[0] == 0
                else f"{best[1]:.3f} (epoch {best[0]})")
            fl = [v for v in loss if not math.isnan(v)]
            rows.append([s, f"{len([e for e in ep if e > 0])}/{planned}", "yes" if st.get("done") else "no",
                         fmt(good[0][1]) if good else "n/a",
                         best_cell,
                         fmt(fl[0]) if fl else "n/a", fmt(fl[-1]) if fl else "n/a"])
        self.add(Table(["stage", "epochs", "finished", "first val AUROC", "best val AUROC", "first train loss",
                        "last train loss"], rows, numeric={3, 4, 5, 6},
                       caption="Validation AUROC = mean over the evaluated classes of the stage's branch. "
                               "Epoch 0 = the stage's starting weights, validated before any training step "
                               f"{self._epoch0_examples()}; a best at epoch 0 "
                               "means no trained epoch beat them and they were kept. Chance = 0.5."))

    def _epoch0_examples(self) -> str:
        """Which stages of this run validate their starting weights, in the method's words."""
        starts = [f"{s}: {e['start']}" for s, e in self.selections.items() if e.get("start")]
        return f"({'; '.join(starts)})" if starts else "(stages that start from trained weights)"

    # ------------------------------------------------------------------ localisation
    def localisation(self) -> None:
        from medattn import figures

        self.add(Heading(2, "Localisation", "localisation"))
        loc = (self.m or {}).get("localization")
        if not self.m:
            self.add(Para(Text.of("No evaluation yet.")))
            return
        if not loc:
            self.add(Para(Text.of("No localisation numbers: the evaluated split has no ground-truth boxes, or the "
                                  "method produces no attention box.")))
            return
        self.add(Para(Text.of(
            f"The model's one attention box per image (class-agnostic, AG-CNN's crop box) against each of the "
            f"{loc.get('n_boxes')} ground-truth boxes on {loc.get('n_images')} images. IoBB = |P∩G| / |P| (the "
            "share of the attention box that lies on the finding; Wang et al.'s measure), IoU = |P∩G| / |P∪G|. "
            "A box counts as localised when its overlap exceeds T.")))
        thr = P.WANG_TIOBB_THRESHOLDS
        per = loc.get("per_class", {})
        header = ["class", "boxes", "mean IoBB", "mean IoU"] + [f"T={t:g} run / Wang" for t in thr]
        rows = []
        order = [c for c in BOX_CLASSES if c in per] + sorted(c for c in per if c not in BOX_CLASSES)
        for c in order:
            e = per[c]
            acc = e.get("acc_iobb", {})
            row = [c, str(e.get("n", "?")), fmt(e.get("iobb_mean")), fmt(e.get("iou_mean"))]
            for t in thr:
                w = P.WANG_TIOBB.get(c, {}).get(t)
                row.append(f"{fmt(acc.get(str(t)))} / {fmt(w) if w is not None else '—'}")
            rows.append(row)
        ov = loc.get("overall", {})
        macro = ov.get("macro_acc_iobb", {})
        wang_macro = {t: float(np.mean([P.WANG_TIOBB[c][t] for c in P.WANG_TIOBB])) for t in thr}
        rows.append(["mean over classes", str(loc.get("n_boxes")), fmt(ov.get("iobb_mean")), fmt(ov.get("iou_mean"))]
                    + [f"{fmt(macro.get(str(t)))} / {wang_macro[t]:.3f}" for t in thr])
        self.add(Table(header, rows, numeric=set(range(1, len(header))), strong_rows={len(rows) - 1},
                       caption="Accuracy = share of ground-truth boxes with IoBB > T. Wang = Wang et al. 2017, "
                               "Table 4 (their own heat-map boxes, several per image and class; a different method "
                               "and split). The mean-IoBB/IoU of the last row is over all boxes."))
        for key, name in (("iobb_values", "IoBB"), ("iou_values", "IoU")):
            vals = loc.get(key)
            if not vals or not any(len(v) for v in vals.values()):
                continue
            self.figure(f"{name.lower()}_distribution.png",
                        lambda p, vals=vals, name=name: figures.plot_iobb_distribution(
                            vals, metric_name=name, thresholds=(0.1, 0.25, 0.5),
                            title=f"{name} of the attention box per ground-truth box", path=p, dpi=110),
                        f"{name} distribution", f"{name} per ground-truth box, per class (box plot with the boxes as "
                        "points) and for all classes (histogram); dashed lines = thresholds T.")

    # ------------------------------------------------------------------ overlays
    def overlays(self) -> None:
        self.add(Heading(2, "Where the model looks", "overlays"))
        try:
            self._overlays()
        except Exception as e:  # the rest of the report is still worth having
            self.add(Para(Text.of(f"No overlays: running the model failed ({type(e).__name__}: {e}).")))

    def _overlays(self) -> None:
        if self.samples <= 0:
            self.add(Para(Text.of("Overlays skipped (--samples 0).")))
            return
        a = self.art
        from medattn.data.prepared import Prepared

        if a.data_dir is None or not Prepared(a.data_dir).exists():
            self.add(Para(Text.of(f"No overlays: the prepared data ({a.data_dir or 'not recorded'}) are not here; "
                                  "pass ", Code("--data PREP"), ".")))
            return
        from medattn.errors import MedattnError
        from hpc import overlays as O
        from hpc.inference import load_model, predict_images
        from medattn.data.prepared import PreparedDataset

        try:
            lm = load_model(a.root, device=self.device, data=a.data_dir,
                            overrides=["runtime.device=cpu"] if str(self.device) == "cpu" else None)
            ds = PreparedDataset.open(a.data_dir)
        except MedattnError as e:
            self.add(Para(Text.of(f"No overlays: {e}")))
            return
        try:
            cand = ds.indices(a.split)
        except MedattnError as e:
            self.add(Para(Text.of(f"No overlays: {e}")))
            return
        eval_labels = list(lm.spec.eval_labels)
        chosen = O.select_samples(ds, cand, self.samples, eval_labels)
        t0 = time.time()
        preds = predict_images(lm, ds.read_batch(chosen))
        self.log(f"overlays: {len(chosen)} images through the stage-'{lm.stage}' model in {time.time() - t0:.1f} s")
        if preds and preds[0].heatmap is None:
            self.add(Para(Text.of(f"Method {lm.cfg.method} gives no attention heat map: no overlays.")))
            return
        n_box = sum(1 for i in chosen if ds.boxes(i))
        self.add(Para(Text.of(
            f"{len(chosen)} images of the {a.split} split ({n_box} with ground-truth boxes, shown first), through "
            f"the model of stage '{lm.stage}' ({lm.checkpoint.name}). Panels: the network's view (the centre crop "
            f"the evaluation uses, shown at the prepared resolution) | the attention heat map "
            f"({lm.method.heatmap_description}) | overlay with the attention box (solid, sky blue) and ground-truth "
            "boxes (dashed, green)" + (f" | {lm.method.crop_description}" if lm.method.crop_description else "")
            + "." + (f" Note: {lm.note}." if lm.note else ""))))
        names = list(lm.spec.label_names)
        images = ds.manifest["image"].to_numpy()
        labels = ds.labels_matrix()
        for i, pred in zip(chosen, preds):
            gt, gl = records_xyxy(ds.boxes(i))
            truth = [names[j] for j in np.flatnonzero(labels[i] > 0)]
            top = O.top_classes(pred, names, eval_labels)
            branch = list(pred.probs)[-1]
            iobb = O.image_iobb(pred, gt)
            cap = (f"{images[i]} — truth: {', '.join(truth) or 'none'}; p({branch}): "
                   f"{O.prob_text(pred, names, top, branch)}")
            if len(iobb):
                cap += "; IoBB per GT box: " + ", ".join(f"{lab} {v:.2f}" for lab, v in zip(gl, iobb))
            stem = Path(str(images[i])).stem
            self.figure(f"overlay_{stem}.png",
                        lambda p, pred=pred, gt=gt, gl=gl, title=f"{images[i]} (truth: {', '.join(truth) or 'none'})":
                        O.draw(pred, p, title, gt, gl, dpi=90),
                        f"overlay {images[i]}", cap)

    # ------------------------------------------------------------------ throughput
    def throughput(self) -> None:
        self.add(Heading(2, "Throughput and wall time", "throughput"))
        rows = []
        total = 0.0
        for s in self.art.stage_names:
            recs = [r for r in self.art.records if r.get("stage") == s]
            if not recs:
                continue
            ips = [float(r["train/images_per_s"]) for r in recs if finite(r.get("train/images_per_s"))]
            tt = sum(float(r["train/time_s"]) for r in recs if finite(r.get("train/time_s")))
            vt = sum(float(r["val/time_s"]) for r in recs if finite(r.get("val/time_s")))
            total += tt + vt
            ws = recs[-1].get("world_size", "?")
            rows.append([s, str(len(recs)), str(ws), f"{np.mean(ips):.1f}" if ips else "n/a",
                         f"{np.median(ips):.1f}" if ips else "n/a", fmt_s(tt), fmt_s(vt), fmt_s(tt + vt)])
        if rows:
            rows.append(["all stages", "", "", "", "", "", "", fmt_s(total)])
            self.add(Table(["stage", "epochs", "processes", "train img/s (mean)", "train img/s (median)",
                            "train time", "validation time", "total"], rows, numeric=set(range(1, 8)),
                           strong_rows={len(rows) - 1},
                           caption=f"From {Run(self.art.root).metrics_path.name}: images per second over all "
                                   "processes, time inside the "
                                   "training and validation loops (start-up and checkpoint writes excluded)."))
        else:
            self.add(Para(Text.of("No epoch recorded yet.")))
        if self.m and finite(self.m.get("time_s")):
            self.add(Para(Text.of(f"Evaluation: {self.m.get('n_images')} images in {fmt_s(self.m['time_s'])} "
                                  f"({self.m.get('images_per_s', float('nan')):.1f} images/s).")))

    # ------------------------------------------------------------------ config, provenance
    def config_and_provenance(self) -> None:
        self.add(Heading(2, "Configuration and provenance", "config"))
        prov = self.art.provenance
        if prov:
            rows = []
            for p in prov:
                git = p.get("git") or {}
                sha = str(git.get("sha") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")
                cmd = " ".join(str(c) for c in (p.get("command") or []))
                hosts = list(dict.fromkeys(p.get("hosts") or []))  # one entry per rank -> per host
                host_txt = ", ".join(hosts) if len(hosts) <= 4 else f"{len(hosts)} hosts: {hosts[0]} … {hosts[-1]}"
                rows.append([str(p.get("time_utc", "?")), sha, host_txt,
                             str(p.get("world_size", "?")), str(p.get("launcher", "?")),
                             str(p.get("slurm_job_id") or "—"), cmd])
            self.add(Table(["launch (UTC)", "git", "hosts", "processes", "launcher", "SLURM job", "command"], rows,
                           caption="One row per launch (a resumed run adds one)."))
            vers = prov[-1].get("versions") or {}
            if vers:
                self.add(Para(Text.of("Versions (latest launch): " + ", ".join(f"{k} {v}" for k, v in vers.items())
                                      + f". Data: {prov[-1].get('data', '?')}; seed {prov[-1].get('seed', '?')}.")))
        else:
            self.add(Para(Text.of("No provenance.json in the run.")))
        self.add(Pre(self.art.config_text, title="Resolved config (config.yaml)"))
        if self.notes:
            self.add(Heading(3, "Notes"))
            self.add(Bullets([Text.of(n) for n in self.notes]))

    def sources(self) -> None:
        self.add(Heading(2, "Sources of the published numbers", "sources"))
        items = [Text.of(Strong(c.name + ": "),
                         f"{c.source}; split: {c.split}." + (f" Note: {c.note}." if c.note else ""))
                 for c in self.columns]
        if self.paper.branch_means:
            items.append(Text.of(Strong(f"{self.paper.name} branch means: "), self.paper.source + "."))
        items.append(Text.of(Strong("T(IoBB) accuracy: "), P.WANG_TIOBB_SOURCE + "."))
        items.append(Text.of(Strong("Official-split references: "), P.OFFICIAL_SPLIT_SOURCE + "."))
        items.append(Text.of("Compiled in the project's research notes (chestxray14.md §4–§6, methods.md §0); "
                             "the numbers are in ", Code("medattn/published.py"), " and the method's module (",
                             Code("Method.published"), ")."))
        self.add(Bullets(items))
