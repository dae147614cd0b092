"""Published ChestX-ray14 results that a run report sets beside its own numbers: the types, the
split protocols, and the dataset's reference columns (CheXNet, Wang et al., Yao et al., the
official-split results, Wang et al.'s localisation table). A method's own paper results belong to
the method (``Method.published``, e.g. AG-CNN's Table I in medattn/methods/agcnn.py); the report
asks the run's method for them.

Numbers only (facts), each with where it was read. The project's research notes hold the full
context: ``chestxray14.md`` §4 (splits), §5 (per-class AUROC) and §6.1 (localisation), and
``methods.md`` §0 (the AG-CNN paper, read from the PDF stored in ``Ien001/AG-CNN``).

**Splits matter more than most method differences.** AG-CNN, CheXNet, Yao et al. and the
14-class Wang et al. column were all measured on *random* 70/10/20 splits, each its own, and none
of their sources says whether by image or by patient (protocol ``unstated``);
official-split results (``train_val_list.txt`` / ``test_list.txt``) run about 0.80-0.83 for
single models and are not comparable with them (chestxray14.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from medattn.data.labels import DISEASES

__all__ = ["PublishedAUROC", "PublishedResults", "REFERENCE_AUROC", "WANG_TIOBB", "WANG_TIOBB_THRESHOLDS",
           "OFFICIAL_SPLIT_MEANS", "PAPER_SPLIT", "PROTOCOLS", "run_protocol", "protocol_matches",
           "reading_matches", "published_mean", "disease_column"]

# How every AUROC column below was split (chestxray14.md §4): AG-CNN Sec. IV-A says random
# 70/10/20 (methods.md §0); CheXNet re-implementations used random 70/10/20 patient splits.
PAPER_SPLIT = "random 70/10/20"

# Protocol labels come from the sources only: a source that does not say whether its random split
# was by image or by patient is ``unstated`` (never comparable), and medattn's reading of it is
# kept apart (``PublishedAUROC.reading``, with the reason in ``reading_note``).

# The split protocols a published column or a run can have. A run's number is called comparable
# with a column only when the two protocols are the same (the test images still differ: each
# random split is its own). ``unstated``: the source does not say, so nothing is comparable.
PROTOCOLS: dict[str, str] = {
    "image-random": "random 70/10/20 by image (patients leak across parts)",
    "patient-random": "random 70/10/20 by patient",
    "official": "the official train_val/test lists",
    "unstated": "random 70/10/20, image or patient not stated by the source",
}
def run_protocol(split_kind: str | None) -> str | None:
    """The protocol of a run's split kind (``prepare --split``): image-random, patient-random
    (random, chexnet), official; None when unknown or not a ChestX-ray14 split."""
    return {"image-random": "image-random", "random": "patient-random", "chexnet": "patient-random",
            "official": "official"}.get(str(split_kind)) if split_kind else None


def protocol_matches(split_kind: str | None, protocol: str) -> bool:
    """Whether a run on ``split_kind`` follows a column's ``protocol`` (never for ``unstated``)."""
    return protocol != "unstated" and run_protocol(split_kind) == protocol


def reading_matches(split_kind: str | None, col: "PublishedAUROC") -> bool:
    """Whether a run on ``split_kind`` follows medattn's *reading* of a column whose source does not
    state its protocol (said as such in reports; never "comparable")."""
    return col.protocol == "unstated" and bool(col.reading) and run_protocol(split_kind) == col.reading


@dataclass(frozen=True)
class PublishedAUROC:
    """One published per-class AUROC column.

    Attributes:
        key: short id used in reports.
        name: column heading.
        per_class: AUROC per disease (canonical NIH spelling, e.g. ``Pleural_Thickening``).
        mean: the mean the source reports over its 14 diseases (None: computed from per_class).
        split: how its test set was drawn.
        protocol: the split protocol (a key of :data:`PROTOCOLS`); decides "comparable".
        source: where the numbers were read.
        note: a caveat to print with the column.
        reading: medattn's reading of an ``unstated`` protocol (a key of :data:`PROTOCOLS`, or
            ""), never used to call the column comparable; ``reading_note`` says why.
    """

    key: str
    name: str
    per_class: dict[str, float]
    mean: float | None
    split: str
    source: str
    note: str = ""
    protocol: str = "unstated"
    reading: str = ""
    reading_note: str = ""

    def reported_mean(self) -> float:
        if self.mean is not None:
            return self.mean
        return sum(self.per_class[d] for d in DISEASES) / len(DISEASES)


def disease_column(values: tuple[float, ...]) -> dict[str, float]:
    """14 values in the canonical disease order -> {disease: value}."""
    assert len(values) == len(DISEASES)
    return dict(zip(DISEASES, values))


# The 14-class comparison table quoted by CheXNet re-implementations, verbatim from the
# arnoweng/CheXNet README (chestxray14.md §5.2); the means are computed from the 14 values.
CHEXNET = PublishedAUROC(
    key="chexnet", name="CheXNet",
    per_class=disease_column((0.8094, 0.9248, 0.8638, 0.7345, 0.8676, 0.7802, 0.7680, 0.8887, 0.7901, 0.8878,
                    0.9371, 0.8047, 0.8062, 0.9164)),
    # The paper's own 14-class split was not released and its unit is not stated in the sources
    # (jrzech issue #5, chestxray14.md §4); its re-implementations drew patient-level splits.
    mean=None, split=PAPER_SPLIT, protocol="unstated", reading="patient-random",
    reading_note="CheXNet's 14-class split was not released (jrzech issue #5); its re-implementations (arnoweng's "
                 "lists, --split chexnet) split by patient",
    source="Rajpurkar et al. 2017, arXiv 1711.05225, as tabulated in the arnoweng/CheXNet README")
WANG14 = PublishedAUROC(
    key="wang", name="Wang et al.",
    per_class=disease_column((0.716, 0.807, 0.784, 0.609, 0.706, 0.671, 0.633, 0.806, 0.708, 0.835, 0.815,
                    0.769, 0.708, 0.767)),
    # "we randomly shuffled the entire dataset into three subgroups" (Wang et al. CVPR 2017): image or
    # patient not stated; the 14-class column is from a later arXiv version whose split is unverified.
    mean=None, split="random", protocol="unstated", reading="image-random",
    reading_note="CVPR 2017: 'we randomly shuffled the entire dataset into three subgroups', patients not stated; "
                 "the 14-class column's own split (arXiv 1705.02315 later version) is unverified (chestxray14.md §4, §5)",
    source="Wang et al. 2017, arXiv 1705.02315 (14-class version), as tabulated in the arnoweng/CheXNet README",
    note="the 14-class result of a later arXiv version of the ChestX-ray8 paper")
YAO = PublishedAUROC(
    key="yao", name="Yao et al.",
    per_class=disease_column((0.772, 0.904, 0.859, 0.695, 0.792, 0.717, 0.713, 0.841, 0.788, 0.882, 0.829,
                    0.767, 0.765, 0.914)),
    mean=None, split="random",
    source="Yao et al. 2017, arXiv 1710.10501, as tabulated in the arnoweng/CheXNet README")

# The dataset's reference columns, shown for every ChestX-ray14 run after the method's own.
REFERENCE_AUROC: tuple[PublishedAUROC, ...] = (CHEXNET, WANG14, YAO)

# Wang et al. 2017 (CVPR, ChestX-ray8), Table 4: localisation accuracy at T(IoBB) for the eight
# classes with boxes (chestxray14.md §6.1). A box is correct when IoBB = |P∩G|/|P| > T.
WANG_TIOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
WANG_TIOBB: dict[str, dict[float, float]] = {
    "Atelectasis": {0.1: 0.7277, 0.25: 0.5500, 0.5: 0.2833, 0.75: 0.1666, 0.9: 0.1333},
    "Cardiomegaly": {0.1: 0.9931, 0.25: 0.9794, 0.5: 0.8767, 0.75: 0.7260, 0.9: 0.6849},
    "Effusion": {0.1: 0.7124, 0.25: 0.5424, 0.5: 0.3333, 0.75: 0.2418, 0.9: 0.2091},
    "Infiltration": {0.1: 0.7886, 0.25: 0.5772, 0.5: 0.4227, 0.75: 0.3252, 0.9: 0.2520},
    "Mass": {0.1: 0.4352, 0.25: 0.2823, 0.5: 0.1411, 0.75: 0.1176, 0.9: 0.0588},
    "Nodule": {0.1: 0.1645, 0.25: 0.0506, 0.5: 0.0126, 0.75: 0.0126, 0.9: 0.0126},
    "Pneumonia": {0.1: 0.7500, 0.25: 0.5583, 0.5: 0.3833, 0.75: 0.2583, 0.9: 0.2416},
    "Pneumothorax": {0.1: 0.4591, 0.25: 0.3469, 0.5: 0.1836, 0.75: 0.1020, 0.9: 0.0816},
}
WANG_TIOBB_SOURCE = ("Wang et al. 2017, CVPR (arXiv 1705.02315), Table 4: heat-map boxes thresholded at "
                     "{60, 180} of 255, 1-3 boxes per class and image")


@dataclass(frozen=True)
class PublishedResults:
    """What a method's paper reported on ChestX-ray14 (``Method.published``), for the report.

    Attributes:
        name, table: the method as its paper names it, and the table of ``branch_means``.
        auroc: per-class AUROC columns of its output (shown beside the run's, before the references).
        branch_means: model variant -> {branch: mean AUROC over the 14 diseases}, for a method with
            several output branches (shown beside the run's branch means).
        source: where ``branch_means`` were read.
        protocol: their split protocol (a key of :data:`PROTOCOLS`).
    """

    name: str = ""  # the method as the paper names it, e.g. "AG-CNN"
    table: str = ""  # where branch_means are, in the paper, e.g. "Table I"
    auroc: tuple[PublishedAUROC, ...] = ()
    branch_means: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = ""
    protocol: str = "unstated"


@dataclass(frozen=True)
class OfficialSplitResult:
    work: str
    model: str
    mean: float


# Best official-split single-model results found (chestxray14.md §5.5; a secondary source that
# states it checked each figure against the paper). Comparable with runs on the official split.
OFFICIAL_SPLIT_MEANS: tuple[OfficialSplitResult, ...] = (
    OfficialSplitResult("Taslimi et al. 2022 (SwinCheX)", "Swin-L, 224 px", 0.810),
    OfficialSplitResult("Xiao et al. 2023", "DenseNet-121 pretrained on 0.3M CXRs, 224 px", 0.812),
    OfficialSplitResult("Goel et al. 2024", "DenseNet-121, 224 px", 0.8202),
    OfficialSplitResult("Kim et al. 2021 (XProtoNet)", "DenseNet-121, 512 px", 0.822),
    OfficialSplitResult("Yao et al. 2025 (EVA-X)", "ViT-S pretrained on 520k CXRs, 224 px", 0.833),
)
OFFICIAL_SPLIT_SOURCE = "research notes chestxray14.md §5.5 (secondary: a 2026 project brief's table)"


def published_mean(col: PublishedAUROC, classes: list[str] | tuple[str, ...]) -> float | None:
    """The column's mean over ``classes`` (those it has), None when it has none of them."""
    vals = [col.per_class[c] for c in classes if c in col.per_class]
    return sum(vals) / len(vals) if vals else None
