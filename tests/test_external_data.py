"""External dataset readers (medattn.data.external) on hand-written CSVs in the published layouts
and on the synthetic fixtures (medattn.data.external_synth): codings, uncertain policies, views,
label maps, paths, and clear errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest

from medattn.data import external as X
from medattn.data.external_synth import write_chexpert, write_mimic, write_padchest
from medattn.errors import DataError

OBS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
       "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
       "Fracture", "Support Devices"]


def _chexpert_csv(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBS)
    (root / "valid.csv").write_text(head + "\n" + "\n".join(rows) + "\n")
    (root / "train.csv").write_text(head + "\n")


def _obs(**kv):
    return ",".join(kv.get(c.replace(" ", "_"), "") for c in OBS)


def test_chexpert_codings_policies_and_views(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    _chexpert_csv(root, [
        "CheXpert-v1.0-small/valid/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
        + _obs(Atelectasis="1.0", Edema="-1.0", Pleural_Effusion="0.0"),
        "CheXpert-v1.0-small/valid/patient00001/study1/view2_lateral.jpg,Female,68,Lateral,,"
        + _obs(Atelectasis="1.0"),
        "CheXpert-v1.0-small/valid/patient00002/study1/view1_frontal.jpg,Male,0,Frontal,PA,"
        + _obs(No_Finding="1.0"),
    ])
    ds = X.read_external("chexpert", root)
    assert ds.split == "valid" and len(ds) == 2  # the lateral is counted, not evaluated
    assert ds.counts["n_frontal"] == 2 and ds.counts["n_lateral"] == 1 and not ds.counts["laterals_evaluated"]
    # Path is relative to the root's parent.
    assert ds.paths[0] == str(tmp_path / "CheXpert-v1.0-small/valid/patient00001/study1/view1_frontal.jpg")
    assert ds.patient.tolist() == ["patient00001", "patient00002"]
    assert ds.view.tolist() == ["AP", "PA"] and ds.sex.tolist() == ["Female", "Male"]
    assert ds.age[0] == 68 and np.isnan(ds.age[1])  # age 0 = unknown
    col = {k: j for j, k in enumerate(ds.label_names)}
    assert set(ds.label_names) == {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion",
                                   "Pneumonia", "Pneumothorax", "No Finding"}
    assert ds.labels[0, col["Atelectasis"]] == 1 and ds.labels[0, col["Effusion"]] == 0
    assert np.isnan(ds.labels[0, col["Edema"]])  # -1.0 ignored by default
    assert ds.labels[1, col["Edema"]] == 0  # blank = not mentioned = negative
    assert ds.counts["uncertain_counts"]["Edema"] == 1
    assert X.read_external("chexpert", root, uncertain="ones").labels[0, col["Edema"]] == 1
    assert X.read_external("chexpert", root, uncertain="zeros").labels[0, col["Edema"]] == 0
    assert len(X.read_external("chexpert", root, views="all")) == 3
    d = ds.describe()
    assert d["uncertain_policy"] == "ignore" and d["label_map"]["Pleural Effusion"] == "Effusion"
    assert "Irvin" in d["label_map_source"]


def test_chexpert_bad_input_names_row_and_column(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    _chexpert_csv(root, ["CheXpert-v1.0-small/valid/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
                         + _obs(Edema="2.0")])
    with pytest.raises(DataError, match=r"valid.csv, row 2, column 'Edema': value '2.0'"):
        X.read_external("chexpert", root)
    (root / "valid.csv").write_text("Path,Sex\nx,y\n")
    with pytest.raises(DataError, match="lacks column"):
        X.read_external("chexpert", root)
    with pytest.raises(DataError, match="uncertain-label policy"):
        X.read_external("chexpert", root, uncertain="maybe")
    with pytest.raises(DataError, match="no split 'test'"):
        X.read_external("chexpert", root, split="test")


def test_chexpert_fixture_and_renamed_folder(tmp_path):
    root = write_chexpert(tmp_path, n_patients=6, size=32, seed=1)
    assert (root / "train.csv").is_file() and (root / "valid.csv").is_file()
    ds = X.read_external("chexpert", root)
    assert all(__import__("os").path.isfile(p) for p in ds.paths)
    assert not np.isnan(ds.labels).any()  # the valid split has no uncertain labels, like the real one
    tr = X.read_external("chexpert", root, split="train")
    assert set(tr.patient).isdisjoint(ds.patient)
    moved = root.rename(tmp_path / "chexpert_here")  # Path's first part no longer matches the folder
    again = X.read_external("chexpert", moved)
    assert all(__import__("os").path.isfile(p) for p in again.paths)


def test_mimic_layout_join_views_and_patients(tmp_path):
    root = write_mimic(tmp_path / "mimic", n_subjects=9, size=32, seed=2)
    ds = X.read_external("mimic", root)
    assert ds.split == "test"
    import os

    assert all(os.path.isfile(p) for p in ds.paths)
    for p, pat in zip(ds.paths, ds.patient):
        parts = p.split(os.sep)
        assert parts[-4] == f"p{pat[:2]}" and parts[-3] == f"p{pat}" and parts[-2].startswith("s")
    assert set(ds.view) <= {"AP", "PA"}
    assert ds.counts["n_other_views"] >= 0 and ds.counts["sex_age_from"].startswith("patients.csv")
    assert set(ds.sex) <= {"F", "M"} and np.all(ds.age >= 20)
    allsplits = X.read_external("mimic", root, split="all", views="all")
    assert allsplits.counts["n_unlabelled_images"] >= 1  # subject 0's first study has no label row
    assert set(allsplits.view) <= {"AP", "PA", "LATERAL"}
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(DataError, match="split not found"):
        X.read_external("mimic", root)


def test_padchest_labels_views_and_exclusions(tmp_path):
    root = write_padchest(tmp_path / "pc", n_patients=10, size=32, seed=3)
    ds = X.read_external("padchest", root)
    import os

    assert all(os.path.isfile(p) for p in ds.paths)
    assert set(ds.view) <= {"PA", "AP"}
    assert ds.counts["n_unlabelled"] == 1 and ds.counts["n_excluded"] == 1
    assert "not applicable" in ds.counts["uncertain_note"]
    assert X.parse_padchest_labels(["['pleural effusion', ' cardiomegaly']", "", "[]"]) == [
        ["pleural effusion", "cardiomegaly"], None, []]


def test_padchest_hand_rows(tmp_path):
    root = tmp_path / "pc"
    root.mkdir()
    head = "ImageID,ImageDir,PatientID,PatientSex_DICOM,PatientBirth,StudyDate_DICOM,Projection,Labels"
    rows = ['a.png,0,p1,F,1950.0,20150101,PA,"[\'loculated pleural effusion\', \' nodule\']"',
            'b.png,0,p1,F,1950.0,20150101,L,"[\'normal\']"',
            'c.png,1,p2,M,1990.0,20120304,AP_horizontal,"[\'subcutaneous emphysema\', \'soft tissue mass\']"',
            'd.png,1,p3,M,1980.0,20120304,COSTAL,"[\'normal\']"']
    (root / X.PADCHEST_FILE).write_text(head + "\n" + "\n".join(rows) + "\n")
    ds = X.read_external("padchest", root)
    col = {k: j for j, k in enumerate(ds.label_names)}
    assert ds.paths == [str(root / "0" / "a.png"), str(root / "1" / "c.png")]
    assert ds.view.tolist() == ["PA", "AP"] and ds.age.tolist() == [65.0, 22.0]
    assert ds.labels[0, col["Effusion"]] == 1 and ds.labels[0, col["Nodule"]] == 1
    # Narrow map: subcutaneous emphysema is not Emphysema, a soft tissue mass is not a lung Mass.
    assert ds.labels[1].sum() == 0
    assert ds.counts["n_lateral"] == 1 and ds.counts["n_other_views"] == 1
