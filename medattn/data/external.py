"""Readers of external chest X-ray datasets, in their published layouts, for external validation of
a model trained on ChestX-ray14 (``medattn eval --dataset chexpert|mimic|padchest --root DIR``).

Each reader returns an :class:`ExternalSet`: one row per image kept, the absolute image path, the
patient, sex, age and view, and the labels of the ChestX-ray14 labels the dataset shares
(:data:`LABEL_MAPS`), 1 / 0 / NaN (NaN = not used for that label, see the uncertain policy).

**CheXpert** (Irvin et al. 2019; ``CheXpert-v1.0`` and ``CheXpert-v1.0-small`` alike): ROOT is the
folder with ``train.csv`` and ``valid.csv``. ``Path`` is relative to ROOT's parent
(``CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg``); the patient is the
``patientNNNNN`` part. Columns used: ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and the
observations, coded ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank not mentioned
(read as negative, as the CheXpert labeller's "no mention"). Age 0 is read as unknown.

**MIMIC-CXR-JPG 2.0.0** (Johnson et al. 2019): ROOT holds ``mimic-cxr-2.0.0-chexpert.csv``,
``mimic-cxr-2.0.0-metadata.csv`` and ``mimic-cxr-2.0.0-split.csv`` (or their published ``.csv.gz``)
and ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` (XX: the first two digits of the subject id).
Labels are per study (CheXpert labeller, same coding as CheXpert), joined to every image of the
study; images of a study without a label row are left out and counted. The view is
``ViewPosition``. MIMIC-CXR-JPG has no sex or age; if MIMIC-IV's ``patients.csv[.gz]``
(``subject_id, gender, anchor_age, anchor_year``) is put in ROOT, sex and the age at the study
(``anchor_age + study year - anchor_year``; dates are shifted consistently per patient) are read.

**PadChest** (Bustos et al. 2020): ROOT holds ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``
(or ``.csv.gz``) and the images as ``ROOT/<ImageDir>/<ImageID>`` (the published zip folders
0..54), or all in ROOT itself. Columns used: ``ImageID, ImageDir, PatientID, PatientSex_DICOM,
PatientBirth (year), StudyDate_DICOM (YYYYMMDD), Projection, Labels`` (a Python list as a string,
e.g. ``['pleural effusion', 'cardiomegaly']``). Age = study year - birth year. Rows without labels,
and rows labelled ``exclude`` by the PadChest team, are left out and counted. PadChest labels
carry no uncertainty; the uncertain policy is reported as not applicable.

**Views.** Frontal films only by default (CheXpert ``Frontal``; MIMIC ``PA``/``AP``; PadChest
``PA``, ``AP``, ``AP_horizontal`` (a supine AP film, view ``AP``)); laterals are counted and
reported, and kept with ``views="all"``. Other projections (MIMIC's ``AP AXIAL``/``LAO``/...,
PadChest's ``COSTAL``/``EXCLUDE``...) are counted and never evaluated.

**Uncertain labels** (CheXpert, MIMIC ``-1.0``): ``ignore`` (default; the image does not count for
that label), ``ones`` (positive) or ``zeros`` (negative): U-Ignore, U-Ones and U-Zeros of Irvin
et al. The policy is named in every output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medattn.errors import DataError

DATASETS = ("chexpert", "mimic", "padchest")
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
VIEW_CHOICES = ("frontal", "all")

# The CheXpert observations (also MIMIC-CXR-JPG's, same labeller) that are ChestX-ray14 labels.
# Same name and definition (Irvin et al. 2019, Table 1; Wang et al. 2017), and "Pleural Effusion"
# = NIH "Effusion". Not mapped, because their definitions differ from any NIH label: Lung Opacity
# (wider than Infiltration), Lung Lesion (Mass and Nodule together), Enlarged Cardiomediastinum,
# Pleural Other (wider than Pleural_Thickening), Fracture, Support Devices.
CHEXPERT_MAP: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Pleural Effusion": "Effusion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "No Finding": "No Finding",
}
# PadChest terms (its UMLS-mapped label vocabulary, Bustos et al. 2020, lower case) read as each NIH
# label: the term of the same name and its listed subtypes in PadChest's label hierarchy.
# Deliberately narrower than torchxrayvision's substring matching, which counts e.g.
# "consolidation" and "alveolar pattern" as Infiltration and "soft tissue mass" as Mass.
PADCHEST_MAP: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "total atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "laminar atelectasis", "round atelectasis", "atelectasis basal"),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
    "Infiltration": ("infiltrates",),
    "Mass": ("mass", "pulmonary mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation",),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening"),
    "Hernia": ("hiatal hernia",),
    "No Finding": ("normal",),
}
LABEL_MAPS: dict[str, dict[str, Any]] = {"chexpert": CHEXPERT_MAP, "mimic": CHEXPERT_MAP, "padchest": PADCHEST_MAP}
LABEL_MAP_SOURCES = {
    "chexpert": "Irvin et al. 2019 (CheXpert, AAAI), Table 1 observations; Wang et al. 2017 (ChestX-ray14) labels",
    "mimic": "Johnson et al. 2019 (MIMIC-CXR-JPG 2.0.0: the CheXpert labeller's 14 observations); as CheXpert",
    "padchest": "Bustos et al. 2020 (PadChest, Med. Image Anal. 66:101797), label hierarchy terms",
}

CHEXPERT_FILES = {"train": "train.csv", "valid": "valid.csv"}
MIMIC_FILES = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv", "metadata": "mimic-cxr-2.0.0-metadata.csv",
               "split": "mimic-cxr-2.0.0-split.csv", "patients": "patients.csv"}
PADCHEST_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
DEFAULT_SPLIT = {"chexpert": "valid", "mimic": "test", "padchest": "all"}
SPLITS = {"chexpert": ("valid", "train"), "mimic": ("test", "validate", "train", "all"), "padchest": ("all",)}


@dataclass
class ExternalSet:
    """The images of an external dataset kept for evaluation, and what was left out."""

    dataset: str
    root: Path
    split: str
    paths: list[str]
    patient: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    view: np.ndarray
    labels: np.ndarray  # (N, K) float: 1, 0, NaN (not counted for that label)
    label_names: list[str]  # the K ChestX-ray14 names
    uncertain: str
    views: str
    label_map: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict[str, Any]:
        """What the output says about the data (JSON-ready)."""
        return {"dataset": self.dataset, "root": str(self.root), "split": self.split,
                "n_images": len(self.paths), "n_patients": int(len(np.unique(self.patient))),
                "views": self.views, "uncertain_policy": self.uncertain, "label_map": self.label_map,
                "label_map_source": LABEL_MAP_SOURCES[self.dataset], **self.counts}


def read_external(dataset: str, root: str | Path, split: str | None = None, uncertain: str = "ignore",
                  views: str = "frontal") -> ExternalSet:
    """Read ``dataset`` (``chexpert``, ``mimic`` or ``padchest``) from ``root`` (see the module doc)."""
    if dataset not in DATASETS:
        raise DataError(None, f"unknown dataset {dataset!r} (use one of {', '.join(DATASETS)})")
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(None, f"unknown uncertain-label policy {uncertain!r} (use one of {', '.join(UNCERTAIN_POLICIES)})")
    if views not in VIEW_CHOICES:
        raise DataError(None, f"unknown views {views!r} (use one of {', '.join(VIEW_CHOICES)})")
    split = split or DEFAULT_SPLIT[dataset]
    if split not in SPLITS[dataset]:
        raise DataError(None, f"{dataset} has no split {split!r} (use one of {', '.join(SPLITS[dataset])})")
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(root, f"{dataset} root is not a directory")
    reader = {"chexpert": _chexpert, "mimic": _mimic, "padchest": _padchest}[dataset]
    return reader(root, split, uncertain, views)


# ------------------------------------------------------------------------------------- helpers
def _read_csv(path: Path, required: tuple[str, ...], what: str):
    import pandas as pd

    if not path.is_file():
        gz = path.with_name(path.name + ".gz")
        if gz.is_file():
            path = gz
        else:
            raise DataError(path, f"{what} not found (nor {gz.name})")
    try:
        df = pd.read_csv(path, low_memory=False, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse error becomes a named DataError
        raise DataError(path, f"cannot read {what}: {e}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(path, f"{what} lacks column(s) {missing} (has {list(df.columns)[:20]})")
    return df, path


def _coded(df, path: Path, columns: dict[str, str], uncertain: str) -> tuple[np.ndarray, dict[str, int]]:
    """CheXpert coding -> (N, K) float 1/0/NaN under the policy, and the uncertain count per label.

    1.0 positive, 0.0 negative, -1.0 uncertain, blank not mentioned (negative)."""
    out = np.zeros((len(df), len(columns)), np.float64)
    n_unc: dict[str, int] = {}
    for j, (col, nih) in enumerate(columns.items()):
        raw = df[col].str.strip()
        val = np.full(len(df), np.nan)
        known = {"": 0.0, "1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0}
        mapped = raw.map(known)
        bad = mapped.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(path, f"value {raw.iloc[i]!r} is not 1.0, 0.0, -1.0 or blank", row=i + 2, column=col)
        val[:] = mapped.to_numpy(np.float64)
        unc = val == -1.0
        n_unc[nih] = int(unc.sum())
        val[unc] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
        out[:, j] = val
    return out, n_unc


def _view_filter(frontal: np.ndarray, lateral: np.ndarray, views: str) -> tuple[np.ndarray, dict[str, int]]:
    keep = frontal | lateral if views == "all" else frontal.copy()
    return keep, {"n_frontal": int(frontal.sum()), "n_lateral": int(lateral.sum()),
                  "n_other_views": int((~frontal & ~lateral).sum()),
                  "laterals_evaluated": views == "all"}


def _float(values) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(np.float64)


# ------------------------------------------------------------------------------------ CheXpert
_PATIENT = re.compile(r"(patient\d+)")


def _chexpert(root: Path, split: str, uncertain: str, views: str) -> ExternalSet:
    path = root / CHEXPERT_FILES[split]
    df, path = _read_csv(path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_MAP),
                         f"CheXpert {CHEXPERT_FILES[split]}")
    if df.empty:
        raise DataError(path, "no rows")
    rel = df["Path"].str.strip()
    patient = rel.str.extract(_PATIENT, expand=False)
    if patient.isna().any():
        i = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise DataError(path, f"Path {rel.iloc[i]!r} has no patientNNNNN part", row=i + 2, column="Path")
    # Path is relative to ROOT's parent and starts with the dataset folder's published name; a
    # renamed folder is found by replacing that first part with ROOT's own name.
    first = rel.str.split("/", n=1).str[0]
    rest = rel.str.split("/", n=1).str[1].fillna("")
    paths = [str(root / r) for r in rest] if (first != root.name).all() else [str(root.parent / r) for r in rel]
    fl = df["Frontal/Lateral"].str.strip()
    bad = ~fl.isin(["Frontal", "Lateral"])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(path, f"Frontal/Lateral {fl.iloc[i]!r} is neither Frontal nor Lateral", row=i + 2,
                        column="Frontal/Lateral")
    frontal = (fl == "Frontal").to_numpy()
    lateral = ~frontal
    view = np.where(frontal, df["AP/PA"].str.strip().str.upper().to_numpy(), "LATERAL").astype(object)
    labels, n_unc = _coded(df, path, CHEXPERT_MAP, uncertain)
    age = _float(df["Age"])
    age[age <= 0] = np.nan  # CheXpert codes an unknown age as 0
    keep, counts = _view_filter(frontal, lateral, views)
    counts.update(n_rows=len(df), uncertain_counts=n_unc, csv=str(path))
    return _subset(ExternalSet("chexpert", root, split, paths, patient.to_numpy().astype(str),
                               df["Sex"].str.strip().to_numpy().astype(object), age, view, labels,
                               list(CHEXPERT_MAP.values()), uncertain, views, dict(CHEXPERT_MAP), counts), keep)


def _subset(ds: ExternalSet, keep: np.ndarray) -> ExternalSet:
    idx = np.flatnonzero(keep)
    ds.paths = [ds.paths[i] for i in idx]
    for name in ("patient", "sex", "age", "view", "labels"):
        setattr(ds, name, getattr(ds, name)[idx])
    if not len(idx):
        raise DataError(ds.root, f"no {ds.views} images left in {ds.dataset} split {ds.split!r} "
                                 f"(counts: {ds.counts})")
    ds.counts["positives"] = {k: int(np.nansum(ds.labels[:, j] == 1)) for j, k in enumerate(ds.label_names)}
    ds.counts["labelled"] = {k: int(np.sum(~np.isnan(ds.labels[:, j]))) for j, k in enumerate(ds.label_names)}
    return ds


# --------------------------------------------------------------------------------------- MIMIC
def _mimic(root: Path, split: str, uncertain: str, views: str) -> ExternalSet:
    meta, meta_path = _read_csv(root / MIMIC_FILES["metadata"], ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                                "MIMIC-CXR-JPG metadata")
    sp, sp_path = _read_csv(root / MIMIC_FILES["split"], ("dicom_id", "split"), "MIMIC-CXR-JPG split")
    lab, lab_path = _read_csv(root / MIMIC_FILES["chexpert"], ("subject_id", "study_id", *CHEXPERT_MAP),
                              "MIMIC-CXR-JPG CheXpert labels")
    for df, p, col in ((meta, meta_path, "subject_id"), (meta, meta_path, "study_id"), (lab, lab_path, "subject_id"),
                       (lab, lab_path, "study_id")):
        bad = ~df[col].str.strip().str.fullmatch(r"\d+")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(p, f"{col} {df[col].iloc[i]!r} is not a number", row=i + 2, column=col)
    meta = meta.merge(sp[["dicom_id", "split"]], on="dicom_id", how="left")
    if meta["split"].isna().any():
        i = int(np.flatnonzero(meta["split"].isna().to_numpy())[0])
        raise DataError(sp_path, f"dicom_id {meta['dicom_id'].iloc[i]} of the metadata has no split row")
    if split != "all":
        meta = meta[meta["split"] == split]
    labelled = meta.merge(lab, on=["subject_id", "study_id"], how="inner")
    n_unlabelled = len(meta) - len(labelled)
    if labelled.empty:
        raise DataError(lab_path, f"no labelled image in split {split!r}")
    vp = labelled["ViewPosition"].str.strip().str.upper()
    frontal = vp.isin(["PA", "AP"]).to_numpy()
    lateral = vp.isin(["LATERAL", "LL"]).to_numpy()
    labels, n_unc = _coded(labelled, lab_path, CHEXPERT_MAP, uncertain)
    subj = labelled["subject_id"].str.strip()
    paths = ("files/p" + subj.str[:2] + "/p" + subj + "/s" + labelled["study_id"].str.strip() + "/"
             + labelled["dicom_id"].str.strip() + ".jpg")
    sex = np.full(len(labelled), "", dtype=object)
    age = np.full(len(labelled), np.nan)
    have_patients = (root / MIMIC_FILES["patients"]).is_file() or (root / (MIMIC_FILES["patients"] + ".gz")).is_file()
    if have_patients:
        pt, _ = _read_csv(root / MIMIC_FILES["patients"], ("subject_id", "gender", "anchor_age", "anchor_year"),
                          "MIMIC-IV patients")
        j = labelled[["subject_id"]].merge(pt, on="subject_id", how="left")
        sex = j["gender"].fillna("").to_numpy().astype(object)
        year = _float(labelled["StudyDate"].str[:4]) if "StudyDate" in labelled.columns else np.nan
        age = _float(j["anchor_age"]) + year - _float(j["anchor_year"])
    keep, counts = _view_filter(frontal, lateral, views)
    counts.update(n_rows=int(len(meta)), n_unlabelled_images=int(n_unlabelled), uncertain_counts=n_unc,
                  sex_age_from=("patients.csv (MIMIC-IV)" if have_patients else None), csv=str(lab_path))
    return _subset(ExternalSet("mimic", root, split, [str(root / p) for p in paths], subj.to_numpy().astype(str),
                               sex, np.asarray(age, np.float64), vp.to_numpy().astype(object), labels,
                               list(CHEXPERT_MAP.values()), uncertain, views, dict(CHEXPERT_MAP), counts), keep)


# ------------------------------------------------------------------------------------ PadChest
def parse_padchest_labels(values) -> list[list[str]]:
    """``"['pleural effusion', ' cardiomegaly']"`` -> ``['pleural effusion', 'cardiomegaly']`` (lower
    case, stripped; PadChest's strings carry stray spaces). Not ``eval``: a list of quoted terms."""
    out = []
    for v in values:
        s = str(v).strip()
        if not s or s.lower() == "nan":
            out.append(None)
            continue
        out.append([t.strip().strip("'\"").strip().lower() for t in s.strip("[]").split(",") if t.strip().strip("'\"").strip()])
    return out


def _padchest(root: Path, split: str, uncertain: str, views: str) -> ExternalSet:
    import pandas as pd

    df, path = _read_csv(root / PADCHEST_FILE, ("ImageID", "ImageDir", "PatientID", "PatientSex_DICOM",
                                                "PatientBirth", "StudyDate_DICOM", "Projection", "Labels"),
                         "PadChest labels CSV")
    terms = parse_padchest_labels(df["Labels"])
    has = np.array([t is not None and len(t) > 0 for t in terms])
    excluded = np.array([t is not None and "exclude" in t for t in terms])
    # One row per (image, term), then a label is positive where any of its terms is: vectorised.
    ex = pd.DataFrame({"row": np.repeat(np.arange(len(df)), [len(t) if t else 0 for t in terms]),
                       "term": [x for t in terms if t for x in t]})
    labels = np.zeros((len(df), len(PADCHEST_MAP)), np.float64)
    for j, (nih, words) in enumerate(PADCHEST_MAP.items()):
        labels[np.unique(ex["row"][ex["term"].isin(words)].to_numpy()), j] = 1.0
    proj = df["Projection"].str.strip()
    frontal = proj.isin(["PA", "AP", "AP_horizontal"]).to_numpy()
    lateral = (proj == "L").to_numpy()
    view = proj.replace({"AP_horizontal": "AP", "L": "LATERAL"}).to_numpy().astype(object)
    birth = _float(df["PatientBirth"])
    year = _float(df["StudyDate_DICOM"].str.strip().str[:4])
    d = df["ImageDir"].str.strip().str.replace(r"\.0$", "", regex=True)
    ids = df["ImageID"].str.strip()
    nested = [str(root / a / b) for a, b in zip(d, ids)]
    flat = [str(root / b) for b in ids]
    # The published zips unpack to ROOT/<ImageDir>/; resized copies are often flat in ROOT.
    paths = nested if not Path(flat[0]).is_file() or Path(nested[0]).is_file() else flat
    keep_lab = has & ~excluded
    keep_view, counts = _view_filter(frontal & keep_lab, lateral & keep_lab, views)
    counts.update(n_rows=len(df), n_unlabelled=int((~has).sum()), n_excluded=int(excluded.sum()),
                  uncertain_counts=None, uncertain_note="PadChest labels carry no uncertainty: policy not applicable",
                  csv=str(path))
    return _subset(ExternalSet("padchest", root, split, paths, df["PatientID"].str.strip().to_numpy().astype(str),
                               df["PatientSex_DICOM"].str.strip().to_numpy().astype(object), year - birth, view,
                               labels, list(PADCHEST_MAP), uncertain, views,
                               {k: list(v) for k, v in PADCHEST_MAP.items()}, counts), keep_view)
