"""Lesion parameters of the synthetic ChestX-ray14 (what each finding looks like, and where).

``plan_findings`` turns an image's labels into (a) changes of the patient's anatomy (an
enlarged heart, hyperinflated lungs, volume loss) and (b) a list of lesion dicts that
``_synth_draw`` rasterises. All sizes are in body units (1.0 = the image width), chosen so that
every finding is still several pixels across at the 112-128 px input of the demo model:
a nodule is 0.028-0.044 wide (29-45 px of the 1024 px image, 3.5-5.5 px at 128 px).

A lesion dict always has ``cls`` (the label) and ``seed`` (for its texture); chronic findings
that persist over a patient's follow-ups reuse the same dict, so they stay in place.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from medattn.data._synth_anatomy import dome_y, hilum, lung_dist, lung_geometry

def _point_in_lung(rng: np.random.Generator, anat: dict, side: int | None, y_range: tuple[float, float],
                   margin: float, avoid: list[tuple[float, float, float]], lateral: tuple[float, float] = (0.0, 1.0)
                   ) -> tuple[int, float, float]:
    """A random point inside a lung, ``margin`` deep, away from earlier lesions.

    Args:
        side: 0/1, or None for either lung.
        y_range: allowed heights (body units).
        lateral: allowed position across the hemithorax, 0 = medial border, 1 = lateral wall.
        avoid: (x, y, radius) of lesions already placed; overlap is allowed only if no free
            spot is found in 60 tries.
    """
    best = None
    for attempt in range(200):
        sd = int(rng.integers(2)) if side is None else side
        g = lung_geometry(anat, sd)
        t = rng.uniform(*lateral)
        x = g["medial"] + (g["lateral"] - g["medial"]) * t
        y = rng.uniform(*y_range)
        if float(lung_dist(anat, sd, x, y)) <= margin:
            continue
        clash = any(math.hypot(x - ax, y - ay) < ar + margin for ax, ay, ar in avoid)
        if not clash or attempt >= 60:
            return sd, x, y
        if best is None:
            best = (sd, x, y)
    if best is not None:
        return best
    # Degenerate anatomy (should not happen): fall back to the middle of the lung.
    sd = 0 if side is None else side
    g = lung_geometry(anat, sd)
    return sd, g["cx"], 0.45


def apply_anatomy_changes(anat: dict, labels: list[str], rng: np.random.Generator) -> dict:
    """A copy of the patient's anatomy changed by the image's findings.

    Cardiomegaly enlarges the heart (cardiothoracic ratio ~0.55-0.65 against ~0.36-0.45);
    Emphysema enlarges and darkens the lungs, flattens the diaphragm and thins the markings;
    Fibrosis shrinks the lungs a little.
    """
    a = copy.deepcopy(anat)
    if "Emphysema" in labels:
        f = {"grow": rng.uniform(0.012, 0.022), "low": rng.uniform(0.04, 0.06),
                               "flat": rng.uniform(0.1, 0.3), "dark": rng.uniform(34.0, 44.0)}
        for lg in a["lungs"]:
            lg["xl"] += f["grow"]
            lg["top"] -= 0.6 * f["grow"]
            lg["cp"] += f["low"]
            lg["dome"] *= f["flat"]
        a["depth"] += f["dark"]
        a["mark_amp"] *= 0.25
        if "Cardiomegaly" not in labels:
            a["heart"]["hx"] *= 0.86   # the long narrow heart of hyperinflation
            a["heart"]["cy"] += 0.02
    if "Cardiomegaly" in labels:
        h = a["heart"]
        h["hx"] = rng.uniform(0.225, 0.255)
        h["hy"] *= rng.uniform(1.18, 1.3)
        h["cx"] += 0.015
        h["cy"] += 0.01
    if "Fibrosis" in labels:
        for lg in a["lungs"]:
            lg["cp"] -= 0.015
            lg["xl"] -= 0.008
    return a


def plan_lesion(cls: str, anat: dict, rng: np.random.Generator, avoid: list) -> dict | None:
    """Parameters of one finding's lesion, placed in ``anat``; None if it draws nothing."""
    u = rng.uniform
    seed = int(rng.integers(2**31))
    if cls == "Nodule":
        # one nodule in half of the films, 2-4 ("multiple pulmonary nodules") in the rest;
        # each gets its own box
        spots = []
        for _ in range(int(rng.choice(4, p=(0.5, 0.25, 0.15, 0.1))) + 1):
            r = u(0.028, 0.036)
            side, x, y = _point_in_lung(rng, anat, None, (0.2, 0.72), r + 0.008, avoid)
            spots.append({"x": x, "y": y, "r": r})
            avoid.append((x, y, r))
        return {"cls": cls, "seed": seed, "spots": spots, "dens": u(0.88, 0.97)}
    if cls == "Mass":
        r = u(0.058, 0.085)
        side, x, y = _point_in_lung(rng, anat, None, (0.22, 0.66), 0.6 * r, avoid, (0.2, 0.85))
        return {"cls": cls, "seed": seed, "x": x, "y": y, "r": r, "dens": u(0.85, 0.95),
                "lob": [u(0.0, 0.12), u(0.0, 0.1)], "ph": [u(0, 6.3), u(0, 6.3)], "ecc": u(0.85, 1.15)}
    if cls == "Cardiomegaly":
        return {"cls": cls, "seed": seed}
    if cls == "Effusion":
        # unilateral, or bilateral in 30 % (one box per side)
        sides = [0, 1] if u() < 0.3 else [int(rng.integers(2))]
        return {"cls": cls, "seed": seed, "dens": u(0.9, 0.97),
                "sides": [{"side": sd, "h": u(0.12, 0.24), "men": u(0.05, 0.09)} for sd in sides]}
    if cls == "Pneumothorax":
        side = int(rng.integers(2))
        return {"cls": cls, "seed": seed, "side": side, "k": u(0.6, 0.74), "ylim": u(0.52, 0.64),
                "dark": u(0.85, 0.95), "line": u(30.0, 45.0)}
    if cls == "Atelectasis":
        if rng.uniform() < 0.6:   # plate-like band
            side, x, y = _point_in_lung(rng, anat, None, (0.46, 0.66), 0.02, avoid, (0.2, 0.8))
            return {"cls": cls, "seed": seed, "kind": "band", "side": side, "x": x, "y": y,
                    "len": u(0.16, 0.23), "t": u(0.03, 0.045), "ang": u(-0.45, 0.45), "dens": u(0.8, 0.92)}
        side = int(rng.integers(2))
        g = lung_geometry(anat, side)
        hx, hy = hilum(anat, side)
        return {"cls": cls, "seed": seed, "kind": "wedge", "side": side,
                "apex": (hx + g["s"] * u(0.0, 0.03), hy + u(0.02, 0.08)),
                "y1": u(0.46, 0.54), "y2": u(0.64, 0.72), "dens": u(0.8, 0.92)}
    if cls == "Infiltration":
        side, x, y = _point_in_lung(rng, anat, None, (0.3, 0.66), 0.03, avoid)
        return {"cls": cls, "seed": seed, "x": x, "y": y, "rx": u(0.085, 0.12), "ry": u(0.1, 0.14),
                "cell": u(0.028, 0.036), "dens": u(0.72, 0.85)}
    if cls == "Pneumonia":
        side, x, y = _point_in_lung(rng, anat, None, (0.3, 0.64), 0.05, avoid, (0.3, 0.8))
        return {"cls": cls, "seed": seed, "side": side, "x": x, "y": y, "r": u(0.085, 0.11), "ecc": u(0.8, 1.25),
                "dens": u(0.75, 0.88), "m": u(20.0, 26.0), "ph": u(0.0, 6.3)}
    if cls == "Consolidation":
        side = int(rng.integers(2))
        if rng.uniform() < 0.45:
            return {"cls": cls, "seed": seed, "kind": "upper", "side": side, "yf": u(0.34, 0.42),
                    "slope": u(-0.12, 0.12), "dens": u(0.85, 0.95)}
        return {"cls": cls, "seed": seed, "kind": "lower", "side": side, "yf": u(0.5, 0.58),
                "slope": u(-0.3, 0.3), "dens": u(0.85, 0.95)}
    if cls == "Edema":
        return {"cls": cls, "seed": seed, "sx": u(0.09, 0.12), "sy": u(0.13, 0.17), "dens": u(0.6, 0.75)}
    if cls == "Emphysema":
        bullae = []
        for _ in range(int(rng.integers(0, 3))):
            r = u(0.025, 0.045)
            side, x, y = _point_in_lung(rng, anat, None, (0.17, 0.4), r, avoid)
            bullae.append((x, y, r))
        return {"cls": cls, "seed": seed, "bullae": bullae}
    if cls == "Fibrosis":
        return {"cls": cls, "seed": seed, "sp": u(0.038, 0.048), "sides": [0, 1] if u() < 0.8 else [int(rng.integers(2))],
                "y0": u(0.32, 0.42), "dens": u(0.72, 0.85)}
    if cls == "Pleural_Thickening":
        # lateral band or apical cap, on one side or (40 %) both
        bands = []
        for side in ([0, 1] if u() < 0.4 else [int(rng.integers(2))]):
            g = lung_geometry(anat, side)
            if rng.uniform() < 0.3:
                bands.append({"kind": "apical", "side": side, "t": u(0.055, 0.07), "y0": g["top"],
                              "y1": g["top"] + u(0.12, 0.16)})
            else:
                y0 = u(0.2, 0.36)
                bands.append({"kind": "lateral", "side": side, "t": u(0.05, 0.065), "y0": y0,
                              "y1": y0 + u(0.26, 0.38)})
        return {"cls": cls, "seed": seed, "bands": bands, "dens": u(0.9, 0.97)}
    if cls == "Hernia":
        g = lung_geometry(anat, 1)
        x = 0.5 + u(0.01, 0.06)
        r = u(0.075, 0.095)
        y = float(dome_y(g, x)) - u(0.0, 0.035)
        return {"cls": cls, "seed": seed, "x": x, "y": y, "r": r, "level": u(-0.15, 0.3),
                "gas": u(20.0, 40.0)}
    raise ValueError(f"no lesion model for {cls!r}")


def lesion_footprint(les: dict) -> list[tuple[float, float, float]]:
    """(x, y, radius) of the localized parts of a lesion, which later lesions should avoid."""
    if "spots" in les:
        return [(s["x"], s["y"], s["r"]) for s in les["spots"]]
    if "x" in les and "r" in les:
        return [(les["x"], les["y"], les["r"])]
    if "x" in les and "rx" in les:
        return [(les["x"], les["y"], max(les["rx"], les["ry"]))]
    if les.get("kind") == "band":
        return [(les["x"], les["y"], les["len"] / 2)]
    return []


def plan_findings(anat: dict, labels: list[str], carried: dict[str, dict], rng: np.random.Generator
                  ) -> tuple[dict, list[dict]]:
    """The anatomy and lesions of one image.

    Args:
        anat: the patient's anatomy.
        labels: the image's findings (``[]`` or ``["No Finding"]`` for a normal image).
        carried: lesions of chronic findings carried over from the previous image of the same
            patient, by label; they are reused unchanged so the finding stays in place.
        rng: the image's generator.

    Returns:
        (anatomy of this image, lesion dicts in drawing order).
    """
    anat2 = apply_anatomy_changes(anat, labels, rng)
    lesions: list[dict] = []
    avoid: list[tuple[float, float, float]] = []
    for les in carried.values():
        avoid.extend(lesion_footprint(les))
    for cls in labels:
        if cls == "No Finding":
            continue
        les = carried.get(cls)
        if les is None:
            les = plan_lesion(cls, anat2, rng, avoid)
            avoid.extend(fp for fp in lesion_footprint(les) if fp not in avoid)
        lesions.append(les)
    return anat2, lesions

