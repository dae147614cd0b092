"""ChestX-ray14 label names, spelled exactly as in ``Finding Labels``.

The 14 diseases are in the conventional CheXNet/Wang order (which every published per-class
table uses); ``No Finding`` is the 15th output that AG-CNN trains but no benchmark reports.
Mean AUROC is always over the 14 diseases.
"""
from __future__ import annotations

DISEASES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
NIH_LABELS: tuple[str, ...] = DISEASES + (NO_FINDING,)

# Other spellings seen in real files: the box list says "Infiltrate", Kaggle's 5% sample says
# "No_Finding".
ALIASES = {"Infiltrate": "Infiltration", "No_Finding": NO_FINDING}

# The eight classes that have boxes in BBox_List_2017.csv.
BOX_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax",
)


def canonical_label(name: str) -> str | None:
    """The canonical spelling of ``name``, or None if it is not a ChestX-ray14 label."""
    name = name.strip()
    name = ALIASES.get(name, name)
    return name if name in NIH_LABELS else None


def parse_finding_labels(field: str) -> list[str]:
    """Split a ``Finding Labels`` value on ``|``; order in the file is not meaningful.

    Raises ValueError naming the unknown label (callers add file and row).
    """
    out = []
    for part in field.split("|"):
        lab = canonical_label(part)
        if lab is None:
            raise ValueError(f"unknown label {part.strip()!r} (expected one of {', '.join(NIH_LABELS)})")
        if lab not in out:
            out.append(lab)
    return out
