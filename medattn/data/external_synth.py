"""Tiny synthetic copies of the external datasets' published layouts (CheXpert-v1.0-small,
MIMIC-CXR-JPG 2.0.0, PadChest), for tests and demos of ``medattn eval --dataset``: the same file
names, CSV columns and codings as :mod:`medattn.data.external` reads, a few dozen small images.
Nothing is downloaded.

The images are noise with, for each positive shared label that is one of the first four
ChestX-ray14 diseases, the bright square of :func:`medattn.data.fake.blob_square`: a model trained
on :func:`medattn.data.fake.write_fake_prepared` data finds those labels here too, which makes a
wrong label map or a shuffled image order visible as an AUROC near 0.5.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medattn.data.external import CHEXPERT_MAP, MIMIC_FILES, PADCHEST_FILE, PADCHEST_MAP
from medattn.data.fake import blob_square
from medattn.data.labels import DISEASES

# The CheXpert/MIMIC observation columns, in the published order.
CHEXPERT_COLUMNS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices")


def _image(rng: np.random.Generator, nih_positive: list[str], size: int, bits: int = 8) -> Image.Image:
    img = (rng.standard_normal((size, size)) * 12 + 60).clip(0, 255)
    for name in nih_positive:
        k = DISEASES.index(name) if name in DISEASES else 99
        if k < 4:
            y0, x0, s = blob_square(k, size)
            img[y0:y0 + s, x0:x0 + s] = 220
    if bits == 16:
        return Image.fromarray((img * 257).astype(np.uint16))
    return Image.fromarray(img.astype(np.uint8), "L")


def _coded_row(rng: np.random.Generator, p_uncertain: float = 0.1) -> tuple[dict[str, str], list[str]]:
    """One CheXpert-coded observation row and the NIH labels drawn positive (for the image)."""
    row, pos = {}, []
    for col in CHEXPERT_COLUMNS:
        if col == "No Finding":
            continue
        r = rng.random()
        if r < 0.3:
            row[col] = "1.0"
            if col in CHEXPERT_MAP:
                pos.append(CHEXPERT_MAP[col])
        elif r < 0.3 + p_uncertain:
            row[col] = "-1.0"
        elif r < 0.7:
            row[col] = "0.0"
        else:
            row[col] = ""  # not mentioned
    row["No Finding"] = "" if any(v == "1.0" for v in row.values()) else "1.0"
    return row, pos


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def write_chexpert(parent: str | Path, n_patients: int = 24, size: int = 64, seed: int = 0,
                   small: bool = True) -> Path:
    """``parent/CheXpert-v1.0-small`` (or ``CheXpert-v1.0``) with train.csv, valid.csv and JPEGs.

    Each patient has 1-2 studies; each study a frontal film (view1_frontal.jpg, AP or PA) and, in
    about a third of the studies, a lateral (view2_lateral.jpg). Patients alternate between the
    valid and train splits. Returns the root (the folder holding the CSVs).
    """
    rng = np.random.default_rng(seed)
    name = "CheXpert-v1.0-small" if small else "CheXpert-v1.0"
    root = Path(parent) / name
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS]
    rows: dict[str, list[dict[str, str]]] = {"train": [], "valid": []}
    for i in range(n_patients):
        split = "valid" if i % 2 == 0 else "train"
        pid = f"patient{64541 + i:05d}"
        sex = "Female" if rng.random() < 0.5 else "Male"
        age = str(int(rng.integers(20, 90)))
        for s in range(1, int(rng.integers(1, 3)) + 1):
            obs, pos = _coded_row(rng, 0.0 if split == "valid" else 0.1)  # valid: radiologist consensus, no -1
            films = [("view1_frontal.jpg", "Frontal", "AP" if rng.random() < 0.4 else "PA")]
            if rng.random() < 0.35:
                films.append(("view2_lateral.jpg", "Lateral", ""))
            for fname, fl, appa in films:
                rel = f"{name}/{split}/{pid}/study{s}/{fname}"
                f = Path(parent) / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                _image(rng, pos, size).save(f, quality=95)
                rows[split].append({"Path": rel, "Sex": sex, "Age": age, "Frontal/Lateral": fl, "AP/PA": appa, **obs})
    for split, fname in (("train", "train.csv"), ("valid", "valid.csv")):
        _write_csv(root / fname, header, rows[split])
    return root


def write_mimic(root: str | Path, n_subjects: int = 24, size: int = 64, seed: int = 0,
                patients: bool = True) -> Path:
    """MIMIC-CXR-JPG 2.0.0's layout in ``root``: the chexpert, metadata and split CSVs and
    ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``; with ``patients`` also MIMIC-IV's patients.csv.
    One study per subject has no label row (MIMIC has such studies)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lab_rows, meta_rows, split_rows, pt_rows = [], [], [], []
    splits = ("test", "train", "validate")
    for i in range(n_subjects):
        subject = str(10000032 + 7919 * i)
        split = splits[i % 3]
        pt_rows.append({"subject_id": subject, "gender": "F" if rng.random() < 0.5 else "M",
                        "anchor_age": str(int(rng.integers(20, 85))), "anchor_year": "2150",
                        "anchor_year_group": "2014 - 2016", "dod": ""})
        for s in range(int(rng.integers(1, 3))):
            study = str(50000000 + 1000 * i + s)
            obs, pos = _coded_row(rng)
            if not (i == 0 and s == 0):
                lab_rows.append({"subject_id": subject, "study_id": study, **obs})
            date = f"{2150 + int(rng.integers(0, 5))}0{int(rng.integers(1, 10))}15"
            vps = ["AP" if rng.random() < 0.5 else "PA"] + (["LATERAL"] if rng.random() < 0.4 else [])
            if rng.random() < 0.1:
                vps.append("AP AXIAL")
            for vp in vps:
                dicom = f"{int(rng.integers(0, 2**63)):016x}-{i:04d}{s}"
                f = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
                f.parent.mkdir(parents=True, exist_ok=True)
                _image(rng, pos if vp in ("AP", "PA") else [], size).save(f, quality=95)
                meta_rows.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                                  "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": vp,
                                  "Rows": str(size), "Columns": str(size), "StudyDate": date, "StudyTime": "101010.0",
                                  "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                                  "ViewCodeSequence_CodeMeaning": "postero-anterior",
                                  "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                split_rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
    _write_csv(root / MIMIC_FILES["chexpert"], ["subject_id", "study_id", *sorted(CHEXPERT_COLUMNS)], lab_rows)
    _write_csv(root / MIMIC_FILES["metadata"], list(meta_rows[0]), meta_rows)
    _write_csv(root / MIMIC_FILES["split"], ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    if patients:
        _write_csv(root / MIMIC_FILES["patients"], list(pt_rows[0]), pt_rows)
    return root


def write_padchest(root: str | Path, n_patients: int = 24, size: int = 64, seed: int = 0) -> Path:
    """PadChest's layout in ``root``: the labels CSV and 16-bit PNGs in ``root/<ImageDir>/``.
    Projections PA, AP, AP_horizontal, L and COSTAL; one row without labels, one ``exclude``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    terms = [t for ts in PADCHEST_MAP.values() for t in ts] + ["aortic elongation", "scoliosis", "kyphosis"]
    header = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
              "ViewPosition_DICOM", "Projection", "MethodProjection", "Labels", "Localizations", "MethodLabel"]
    rows = []
    for i in range(n_patients):
        pid = f"{int(rng.integers(10**17, 10**18))}{i:020d}"
        birth = f"{int(rng.integers(1925, 1995))}.0"
        sex = "F" if rng.random() < 0.5 else "M"
        for s in range(int(rng.integers(1, 3))):
            date = f"{int(rng.integers(2009, 2018))}0{int(rng.integers(1, 10))}1{s}"
            study = f"{pid[:20]}{s}"
            if rng.random() < 0.25:
                found = ["normal"]
            else:
                found = sorted(set(rng.choice(terms, size=int(rng.integers(1, 4)), replace=False).tolist()))
                found = [t for t in found if t != "normal"] or ["normal"]
            pos = [nih for nih, ts in PADCHEST_MAP.items() if any(t in ts for t in found)]
            projs = ["AP_horizontal" if rng.random() < 0.2 else ("AP" if rng.random() < 0.3 else "PA")]
            projs += ["L"] if rng.random() < 0.4 else []
            projs += ["COSTAL"] if rng.random() < 0.05 else []
            for proj in projs:
                image_id = f"{pid}_{s:02d}-{len(rows):03d}-{proj[:2]}.png"
                d = str(int(rng.integers(0, 3)))
                f = root / d / image_id
                f.parent.mkdir(parents=True, exist_ok=True)
                _image(rng, pos if proj in ("PA", "AP", "AP_horizontal") else [], size, bits=16).save(f)
                # PadChest's strings: a python list of quoted terms, with stray spaces.
                label_str = "[" + ", ".join(f"'{t}'" if k else f"' {t}'" for k, t in enumerate(found)) + "]"
                rows.append({"ImageID": image_id, "ImageDir": d, "StudyDate_DICOM": date, "StudyID": study,
                             "PatientID": pid, "PatientBirth": birth, "PatientSex_DICOM": sex,
                             "ViewPosition_DICOM": {"AP_horizontal": "AP", "L": "LATERAL"}.get(proj, proj),
                             "Projection": proj, "MethodProjection": "Manual review of DICOM fields",
                             "Labels": label_str, "Localizations": "[]", "MethodLabel": "Physician"})
    rows[1]["Labels"] = ""  # a row without labels
    rows[2]["Labels"] = "['exclude']"  # excluded by the PadChest team
    _write_csv(root / PADCHEST_FILE, header, rows)
    return root
