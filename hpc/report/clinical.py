"""The report's sections beyond AUROC, read from the evaluation's metrics.json (written by
:mod:`hpc.clinical_eval`) and from the run's external evaluations (:mod:`hpc.external_eval`):
calibration (a reliability diagram per branch, ECE and Brier before and after the temperature),
operating points, subgroup AUROC with the largest gap per label, and external validation.

``hpc.report.build`` calls :func:`add_sections` once, after the classification section; a
metrics.json written before these existed simply has no such sections.
"""
from __future__ import annotations

import json
from typing import Any

from hpc.report.doc import Heading, Para, Table, Text


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{nd}f}"


def _ci(v: Any, ci: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{v:.3f} (too few)"


def add_sections(b) -> None:
    """Add the sections to the report being built by ``b`` (an ``hpc.report.build._Builder``)."""
    m = b.m or {}
    if m.get("calibration"):
        calibration(b, m)
    if (m.get("operating_points") or {}).get("points"):
        operating_points(b, m)
    if (m.get("subgroups") or {}).get("attributes"):
        subgroups(b, m)
    external(b)


def calibration(b, m: dict[str, Any]) -> None:
    from medattn import figures

    cal = m["calibration"]
    labels = list(m.get("eval_labels") or [])
    fitted = cal.get("fitted_on") or {}
    b.add(Heading(2, "Calibration"))
    b.add(Para(Text.of(
        f"Do the probabilities mean what they say? Expected calibration error (ECE, {cal['n_bins']} bins, "
        "equal-width and equal-mass) and Brier score on the "
        f"{m.get('split')} split, before and after temperature scaling (one temperature per label, fitted on "
        f"the validation split, {fitted.get('n_images', '?')} images; a label with too few validation positives "
        "gets the temperature of all labels pooled). A temperature does not change AUROC. "
        "The diagrams pool every evaluated label's predictions.")))
    rows = []
    for br in b.branches:
        e = cal.get(br) or {}
        before, after = e.get("before") or {}, e.get("after") or {}
        rows.append([br, *(f"{_fmt((before.get(k) or {}).get('mean'))} → {_fmt((after.get(k) or {}).get('mean'))}"
                           for k in ("ece_equal_width", "ece_equal_mass", "brier"))])
    b.add(Table(["branch", "ECE equal-width (before → after)", "ECE equal-mass", "Brier"], rows,
                caption=f"Means over the evaluated labels ({', '.join(labels)})."))
    out_branch = b.branches[-1] if b.branches else None
    for br in b.branches:
        e = cal.get(br) or {}
        curves = {}
        if (e.get("before") or {}).get("reliability"):
            curves["before"] = e["before"]["reliability"]
        if (e.get("after") or {}).get("reliability"):
            curves["after temperature"] = e["after"]["reliability"]
        if curves:
            b.figure(f"reliability_{br}.png", lambda p, c=curves, br=br: figures.plot_reliability(
                c, title=f"Reliability, {br} branch", path=p), f"Reliability diagram, {br} branch",
                f"Observed frequency against mean predicted probability in 15 equal-width bins, {br} branch, "
                f"{m.get('split')} split, every evaluated label pooled; below: predictions per bin (log scale).")
    e = cal.get(out_branch) or {}
    t = (e.get("temperature") or {}).get("temperature") or {}
    kind = (e.get("temperature") or {}).get("kind") or {}
    if t:
        rows = [[k, f"{t[k]:.3f}" + (" (pooled)" if kind.get(k) == "pooled" else ""),
                 f"{_fmt(e['before']['ece_equal_width'].get(k))} → {_fmt(e['after']['ece_equal_width'].get(k))}",
                 f"{_fmt(e['before']['brier'].get(k))} → {_fmt(e['after']['brier'].get(k))}"] for k in labels if k in t]
        b.add(Table(["label", "temperature", "ECE equal-width", "Brier"], rows, numeric={1},
                    caption=f"Per label, {out_branch} branch: p' = sigmoid(logit(p) / T). Stored in the run for "
                            "`medattn predict --calibrated`."))


def operating_points(b, m: dict[str, Any]) -> None:
    op = m["operating_points"]
    b.add(Heading(2, "Operating points"))
    b.add(Para(Text.of(
        f"Thresholds chosen per label on the validation split ({op['branch']} branch): Youden's J "
        "(sensitivity + specificity − 1 maximal), and the highest threshold reaching sensitivity 0.90 and 0.95. "
        f"Sensitivity, specificity, PPV and NPV on the {m.get('split')} split, with patient-clustered bootstrap "
        "95% intervals; a label with fewer than 5 positive patients gets none (too few). "
        "`medattn predict --operating-point NAME` writes these calls.")))
    rows = []
    for name, per in op["points"].items():
        for k, e in per.items():
            rows.append([name, k, _fmt(e.get("threshold")),
                         *(_ci(e.get(r), e.get(f"{r}_ci")) for r in ("sensitivity", "specificity", "ppv", "npv"))])
    b.add(Table(["point", "label", "threshold", "sensitivity", "specificity", "PPV", "NPV"], rows, numeric={2}))


def subgroups(b, m: dict[str, Any]) -> None:
    sg = m["subgroups"]
    attrs = sg["attributes"]
    labels = list(m.get("eval_labels") or [])
    b.add(Heading(2, "Subgroups"))
    b.add(Para(Text.of(
        f"AUROC per sex, age band ({', '.join(sg.get('age_bands', []))} years) and view, {sg.get('branch')} branch, "
        f"{m.get('split')} split, with patient-clustered bootstrap 95% intervals within each subgroup. "
        "“too few”: fewer than 5 positive patients in the subgroup, no interval; such subgroups are left out of "
        "the gap (largest minus smallest AUROC within an attribute).")))
    cols = [(a, g) for a, groups in attrs.items() for g in groups]
    header = ["label", *(f"{a}: {g} (n={attrs[a][g]['n_images']})" for a, g in cols), "largest gap"]
    rows = []
    for k in labels:
        gap = (sg.get("largest_gap") or {}).get(k)
        gap_s = f"{gap['gap']:.3f} ({gap['attribute']}: {gap['high']} vs {gap['low']})" if gap else "n/a"
        rows.append([k, *(_ci(attrs[a][g]["auroc"].get(k), attrs[a][g]["ci"].get(k)) for a, g in cols), gap_s])
    b.add(Table(header, rows, caption="AUROC [95% interval] per subgroup."))


def external(b) -> None:
    from hpc.run import EvalDir, Run

    dirs = Run(b.art.root).external_eval_dirs()
    if not dirs:
        return
    b.add(Heading(2, "External validation"))
    b.add(Para(Text.of(
        "The same model on other hospitals' data, read in their published layouts (`medattn eval --dataset`), "
        "on the ChestX-ray14 labels each shares (label maps and sources: docs/evaluation.md). AUROC per label "
        "over the images labelled for it, with patient-clustered bootstrap 95% intervals.")))
    for name, d in dirs.items():
        try:
            r = json.loads(EvalDir(d).metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            b.add(Para(Text.of(f"{name}: unreadable {EvalDir(d).metrics_path} ({e})")))
            continue
        br = r.get("output_branch")
        rows = []
        for k in r.get("shared_labels", []):
            e = (r.get("per_label") or {}).get(k, {})
            rows.append([k, _ci(r["auroc"][br].get(k), r["auroc_ci"][br].get(k)), str(e.get("n_labelled", "")),
                         str(e.get("n_positive", ""))])
        rows.append([f"mean ({', '.join(r.get('mean_over', []))})", _fmt(r["auroc"][br].get("mean")), "", ""])
        b.add(Heading(3, f"{name} ({r.get('split')})"))
        b.add(Para(Text.of(
            f"{r.get('n_images_evaluated')} {r.get('views')} images of {r.get('n_patients_evaluated')} patients "
            f"({r.get('n_lateral')} laterals {'evaluated' if r.get('laterals_evaluated') else 'counted, not evaluated'}"
            f"; {r.get('n_unreadable', 0)} unreadable); uncertain labels: {r.get('uncertain_policy')}; "
            f"label map: {r.get('label_map_source')}.")))
        b.add(Table(["label", "AUROC [95% CI]", "labelled", "positive"], rows, numeric={2, 3},
                    strong_rows={len(rows) - 1}))
