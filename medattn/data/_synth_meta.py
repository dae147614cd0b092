"""Metadata of the synthetic ChestX-ray14: patients, follow-ups, labels, splits and the exact
text of the NIH files (v2020 Data_Entry, BBox_List_2017, the two split lists).

Formats follow the real files byte for byte (../shared/research/chestxray14.md §1):
v2020 header without trailing comma, LF, rows sorted by (Patient ID, Follow-up #); the box
list's 9-field header with 6-field rows, ``Infiltrate``, 1024-px coordinates; split lists
sorted, LF, no newline at the end.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from medattn.data.labels import BOX_CLASSES, DISEASES, NO_FINDING

DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BOX_SPELLING = {"Infiltration": "Infiltrate"}

# Share of images with each finding (No Finding is ~50 %). The order of the real set is kept
# (Infiltration most common, Hernia rarest) but the rare classes are raised so that a
# 1,600-image set still has ~10 test positives of each; real shares are in the comment.
PREVALENCE: dict[str, float] = {
    "Infiltration": 0.14,        # real 0.177
    "Effusion": 0.10,            # 0.119
    "Atelectasis": 0.09,         # 0.103
    "Nodule": 0.075,             # 0.056
    "Mass": 0.055,               # 0.052
    "Pneumothorax": 0.05,        # 0.047
    "Consolidation": 0.045,      # 0.042
    "Pleural_Thickening": 0.045, # 0.030
    "Cardiomegaly": 0.045,       # 0.025
    "Emphysema": 0.04,           # 0.022
    "Edema": 0.04,               # 0.021
    "Fibrosis": 0.045,           # 0.015
    "Pneumonia": 0.04,           # 0.013
    "Hernia": 0.035,             # 0.002
}
ABNORMAL_SHARE = 0.5
N_FINDINGS_P = (0.62, 0.26, 0.09, 0.03)        # 1, 2, 3, 4 findings on an abnormal image
# Findings that usually persist over a patient's follow-ups (kept in place when carried).
CHRONIC = frozenset({"Cardiomegaly", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "Nodule", "Mass"})
CARRY_P = 0.5
TEST_SHARE = 0.23

# (width, height, pixel spacings written as in v2020, weight) of the original DICOMs.
ORIGINAL_SIZES = (
    (2500, 2048, ("0.168", "0.171", "0.139"), 0.33),
    (2992, 2991, ("0.14300000000000002",), 0.20),
    (3056, 2544, ("0.139",), 0.14),
    (2048, 2500, ("0.171", "0.168"), 0.08),
    (2021, 2021, ("0.19431099999999998", "0.19431400000000001"), 0.04),
)
OTHER_SPACINGS = ("0.14300000000000002", "0.139", "0.143", "0.115")


@dataclass
class ImageMeta:
    """One image of the synthetic set (row of Data_Entry plus what the renderer needs)."""
    index: int = -1                 # position in sorted image-id order (the RNG key)
    image: str = ""
    patient: int = 0
    number: int = 0                 # the 3-digit suffix of the id
    follow_up: int = 0
    age: int = 0
    sex: str = "M"
    view: str = "PA"
    width: int = 2500
    height: int = 2048
    spacing: str = "0.168"
    labels: list[str] = field(default_factory=list)     # canonical, [] = No Finding
    carried: list[str] = field(default_factory=list)    # chronic labels kept from the previous image
    split: str = "train_val"
    rgba: bool = False
    box_labels: list[str] = field(default_factory=list)  # labels whose box goes into the box list

    @property
    def finding_labels(self) -> str:
        return "|".join(sorted(self.labels)) if self.labels else NO_FINDING


def _draw_labels(rng: np.random.Generator) -> list[str]:
    """Findings of one image drawn afresh: [] (No Finding) or 1-4 distinct diseases."""
    if rng.uniform() >= ABNORMAL_SHARE:
        return []
    k = int(rng.choice(len(N_FINDINGS_P), p=N_FINDINGS_P)) + 1
    w = np.array([PREVALENCE[d] for d in DISEASES])
    idx = rng.choice(len(DISEASES), size=k, replace=False, p=w / w.sum())
    return [DISEASES[i] for i in sorted(idx)]


def _images_per_patient(rng: np.random.Generator) -> int:
    # Real set: 57 % of patients have one image, a long tail up to 184; here capped at 16.
    if rng.uniform() < 0.55:
        return 1
    return int(min(16, 2 + rng.geometric(0.35) - 1 + rng.geometric(0.5) - 1))


def plan_patients(n_images: int, seed: int) -> list[ImageMeta]:
    """Patients, follow-ups and labels of ``n_images`` images, in (patient, follow-up) order."""
    rng = np.random.default_rng([seed, 0])
    rows: list[ImageMeta] = []
    patient = 0
    while len(rows) < n_images:
        patient += 1
        n = min(_images_per_patient(rng), n_images - len(rows))
        sex = "M" if rng.uniform() < 0.565 else "F"
        age = int(np.clip(round(rng.normal(47, 17)), 1, 92))
        p_ap = 0.25 if n == 1 else 0.5
        # Image numbers are chronological except for a few patients (as in v2020, where the
        # id suffix is not always the follow-up number).
        numbers = list(range(n))
        if n >= 3 and rng.uniform() < 0.12:
            i, j = sorted(rng.choice(n, size=2, replace=False))
            numbers[i], numbers[j] = numbers[j], numbers[i]
        prev: list[str] = []
        for fu in range(n):
            if fu > 0 and rng.uniform() < 0.25:
                age = min(age + 1, 95)
            fresh = _draw_labels(rng)
            carried: list[str] = []
            if fu > 0 and rng.uniform() < CARRY_P:
                carried = [c for c in prev if c in CHRONIC]
                labels = sorted(set(carried) | {c for c in fresh if c not in CHRONIC})
            else:
                labels = fresh
            k = int(rng.choice(len(ORIGINAL_SIZES) + 1, p=[s[3] for s in ORIGINAL_SIZES] + [0.21]))
            if k < len(ORIGINAL_SIZES):
                w, h, spacings, _ = ORIGINAL_SIZES[k]
                sp = spacings[int(rng.integers(len(spacings)))]
            else:
                w, h = int(rng.integers(1900, 3050)), int(rng.integers(1900, 3050))
                sp = OTHER_SPACINGS[int(rng.integers(len(OTHER_SPACINGS)))]
            rows.append(ImageMeta(image=f"{patient:08d}_{numbers[fu]:03d}.png", patient=patient, number=numbers[fu],
                                  follow_up=fu, age=age, sex=sex, view="AP" if rng.uniform() < p_ap else "PA",
                                  width=w, height=h, spacing=sp, labels=labels, carried=carried))
            prev = labels
    order = sorted(range(len(rows)), key=lambda i: rows[i].image)
    for idx, i in enumerate(order):
        rows[i].index = idx
    return rows


def split_patients(rows: list[ImageMeta], seed: int, test_share: float = TEST_SHARE) -> None:
    """Assign whole patients to ``test`` (~23 % of images) or ``train_val``, in place.

    Iterative stratification by patient: findings are served rarest first, and each patient
    goes to the part whose need for that finding is relatively larger, so every finding
    (No Finding included) has about ``test_share`` of its images in the test list. The real
    split was not stratified, but the real set is 70 times larger; at 1,600 images an
    unstratified split can leave a rare class with two test positives.
    """
    rng = np.random.default_rng([seed, 1])
    by_patient: dict[int, list[ImageMeta]] = {}
    for r in rows:
        by_patient.setdefault(r.patient, []).append(r)
    patients = list(by_patient)
    rng.shuffle(patients)
    keys = DISEASES + (NO_FINDING,)

    def pcount(p: int) -> Counter:
        c = Counter(lab for r in by_patient[p] for lab in (r.labels or [NO_FINDING]))
        c["_images"] = len(by_patient[p])
        return c

    pc = {p: pcount(p) for p in patients}
    total = Counter()
    for c in pc.values():
        total.update(c)
    want = {"test": {k: test_share * total[k] for k in keys + ("_images",)},
            "train_val": {k: (1 - test_share) * total[k] for k in keys + ("_images",)}}
    have = {"test": Counter(), "train_val": Counter()}
    part: dict[int, str] = {}
    for k in sorted(keys, key=lambda k: (total[k], keys.index(k))):
        for p in patients:
            if p in part or pc[p][k] == 0:
                continue

            def need(f: str, key: str) -> float:
                return (want[f][key] - have[f][key]) / max(want[f][key], 1e-9)

            nt, nv = need("test", k), need("train_val", k)
            if abs(nt - nv) < 1e-9:
                nt, nv = need("test", "_images"), need("train_val", "_images")
            f = "test" if nt > nv else "train_val"
            part[p] = f
            have[f].update(pc[p])
    parts = set(part.values())
    if len(patients) >= 2 and len(parts) == 1:   # never leave a part empty
        only = parts.pop()
        p = min(patients, key=lambda p: len(by_patient[p]))
        part[p] = "test" if only == "train_val" else "train_val"
    for r in rows:
        r.split = part[r.patient]


def choose_extras(rows: list[ImageMeta], seed: int) -> None:
    """Pick the RGBA images (~0.5 %) and which test findings get a box, in place.

    Like the real box list, boxes exist only for test images, for about 60 % of the test
    images that have a box class, mostly one box per image.
    """
    rng = np.random.default_rng([seed, 2])
    n = len(rows)
    n_rgba = max(1, round(0.005 * n)) if n >= 20 else 0
    by_index = sorted(rows, key=lambda r: r.index)
    for i in rng.choice(n, size=n_rgba, replace=False) if n_rgba else []:
        by_index[int(i)].rgba = True
    for r in by_index:
        cands = [c for c in r.labels if c in BOX_CLASSES]
        if r.split != "test" or not cands or rng.uniform() >= 0.6:
            continue
        keep = [c for c in cands if rng.uniform() < 0.55]
        r.box_labels = keep or [cands[int(rng.integers(len(cands)))]]


def archive_of(index: int) -> str:
    """Kaggle folder of the image at sorted position ``index`` (4,999 first, then 10,000 each)."""
    k = 1 if index < 4999 else 2 + (index - 4999) // 10000
    return f"images_{k:03d}"


def data_entry_text(rows: list[ImageMeta]) -> str:
    """``Data_Entry_2017_v2020.csv``: header, rows by (patient, follow-up), LF, final newline."""
    out = [DATA_ENTRY_HEADER]
    for r in sorted(rows, key=lambda r: (r.patient, r.follow_up)):
        out.append(f"{r.image},{r.finding_labels},{r.follow_up},{r.patient},{r.age},{r.sex},{r.view},"
                   f"{r.width},{r.height},{r.spacing},{r.spacing}")
    return "\n".join(out) + "\n"


def _fmt(v: float) -> str:
    return f"{v:.15g}"


def box_rows(rows: list[ImageMeta], boxes: dict[int, dict[str, list[tuple[float, float, float, float]]]]
             ) -> list[tuple[str, str, float, float, float, float]]:
    """The box list's rows (image, label as spelled in the file, x, y, w, h in 1024-px space).

    ``boxes`` maps image index -> label -> image-normalised (u0, v0, u1, v1) boxes from the
    renderer (several for multiple nodules or a bilateral effusion: one row each).
    Coordinates are snapped to whole pixels of the original DICOM and scaled to 1024 (that is
    how NIH's boxes were made, and why they are fractional), grouped by class like the file.
    """
    out = []
    for cls in BOX_CLASSES:
        for r in sorted(rows, key=lambda r: r.image):
            if cls not in r.box_labels or cls not in boxes.get(r.index, {}):
                continue
            for u0, v0, u1, v1 in boxes[r.index][cls]:
                x0 = math.floor(u0 * r.width) * 1024.0 / r.width
                x1 = min(math.ceil(u1 * r.width), r.width) * 1024.0 / r.width
                y0 = math.floor(v0 * r.height) * 1024.0 / r.height
                y1 = min(math.ceil(v1 * r.height), r.height) * 1024.0 / r.height
                out.append((r.image, BOX_SPELLING.get(cls, cls), x0, y0, x1 - x0, y1 - y0))
    return out


def bbox_text(box_list: list[tuple[str, str, float, float, float, float]]) -> str:
    """``BBox_List_2017.csv``: 9-field header, 6-field rows, LF, final newline."""
    out = [BBOX_HEADER]
    for img, lab, x, y, w, h in box_list:
        out.append(f"{img},{lab},{_fmt(x)},{_fmt(y)},{_fmt(w)},{_fmt(h)}")
    return "\n".join(out) + "\n"


def list_text(ids: list[str]) -> str:
    """A split list: sorted ids, LF, no newline at the end (like the real files)."""
    return "\n".join(sorted(ids))
