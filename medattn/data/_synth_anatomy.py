"""Chest anatomy of the synthetic ChestX-ray14: parameters and the implicit shapes.

Everything here is in *body coordinates* ``(x, y)`` in [0, 1]², x to the image right (the
patient's left, radiological convention), y downwards. The renderer maps the pixel grid into
body coordinates with a small per-image shift/scale/rotation, so the same functions serve the
raster (arrays) and the planner (scalars, to place lesions inside a lung).

Sides: ``0`` is the image-left lung (patient's right), ``1`` the image-right lung.
"""
from __future__ import annotations

import math

import numpy as np

SIDES = (0, 1)


def side_sign(side: int) -> float:
    """-1 for the image-left lung, +1 for the image-right one."""
    return -1.0 if side == 0 else 1.0


def sample_anatomy(rng: np.random.Generator, sex: str, age: int) -> dict:
    """Per-patient anatomy: trunk, lungs, heart, diaphragm, bones, grey levels.

    Args:
        rng: the patient's generator.
        sex: ``"M"`` or ``"F"`` (women get a slightly smaller thorax and breast shadows).
        age: years (children get a relatively larger heart and fainter ribs).
    """
    u = rng.uniform
    small = 0.97 if sex == "F" else 1.0
    lungs = []
    for side in SIDES:
        lungs.append({
            "xl": u(0.365, 0.39) * small,     # lateral wall, distance from the midline
            "xm": u(0.055, 0.07),              # medial border
            "top": u(0.12, 0.145),              # apex
            "cp": u(0.76, 0.79) + (0.015 if side == 1 else 0.0),   # costophrenic angle
            "dome": u(0.08, 0.1) * (1.12 if side == 0 else 1.0),  # the right dome is higher
            "taper": u(0.26, 0.33),            # apex-to-full-width height
        })
    return {
        "bw": u(0.42, 0.45) * small,          # trunk half width
        "t_center": u(200.0, 210.0),          # soft tissue grey level, centre and edge
        "t_edge": u(135.0, 150.0),
        "air": u(6.0, 22.0),
        "depth": u(112.0, 124.0),             # how much darker aerated lung is
        "lungs": lungs,
        "heart": {"cx": u(0.545, 0.555), "cy": u(0.635, 0.65), "hx": u(0.14, 0.155),
                  "hy": u(0.125, 0.14), "rot": u(0.15, 0.25)},
        "knob": u(0.012, 0.025),              # aortic knob bulge (image right, upper mediastinum)
        "rib_sp": u(0.058, 0.068), "rib_off": u(0.0, 1.0), "rib_c1": u(1.3, 1.8),
        "rib_amp": u(6.0, 10.0) * (0.6 if age < 12 else 1.0),
        "clav_y": u(0.145, 0.175), "clav_slope": u(0.1, 0.22),
        "mark_amp": u(11.0, 16.0),
        "breast": u(10.0, 18.0) if sex == "F" and age >= 14 else 0.0,
        "gastric": u() < 0.55,
        "gastric_r": u(0.025, 0.04),
    }


def lung_geometry(anat: dict, side: int) -> dict:
    """Derived numbers of one hemithorax: centre, half width, apex, dome curve."""
    lg = anat["lungs"][side]
    s = side_sign(side)
    lateral = 0.5 + s * lg["xl"]
    medial = 0.5 + s * lg["xm"]
    cx = 0.5 * (lateral + medial)
    a = 0.5 * (lg["xl"] - lg["xm"])
    return {"s": s, "lateral": lateral, "medial": medial, "cx": cx, "a": a,
            "top": lg["top"], "cp": lg["cp"], "dome": lg["dome"], "taper": lg["taper"],
            "dc": cx - s * 0.15 * a, "dw": 1.08 * a}


def half_width(g: dict, y):
    """Half width of the hemithorax at height ``y``: rounded apex, straight below ``taper``."""
    t = np.clip((y - g["top"]) / g["taper"], 0.0, 1.0)
    return g["a"] * np.sqrt(1.0 - (1.0 - t) ** 2)


def dome_y(g: dict, x):
    """The diaphragm: y of the dome surface under hemithorax ``g`` at ``x``."""
    q = np.clip(1.0 - ((x - g["dc"]) / g["dw"]) ** 2, 0.0, 1.0)
    return g["cp"] - g["dome"] * np.sqrt(q)


def heart_dist(anat: dict, x, y):
    """Signed depth inside the heart ellipse (body units, > 0 inside)."""
    h = anat["heart"]
    c, sn = math.cos(h["rot"]), math.sin(h["rot"])
    dx, dy = x - h["cx"], y - h["cy"]
    xr = c * dx + sn * dy
    yr = -sn * dx + c * dy
    q = np.sqrt((xr / h["hx"]) ** 2 + (yr / h["hy"]) ** 2)
    return (1.0 - q) * min(h["hx"], h["hy"])


def hemithorax_dist(anat: dict, side: int, x, y):
    """Signed depth inside the hemithorax (lateral wall, apex, medial border, diaphragm)."""
    g = lung_geometry(anat, side)
    d_lat = half_width(g, y) - np.abs(x - g["cx"])
    d_top = y - g["top"]
    d_dome = dome_y(g, x) - y
    return np.minimum(np.minimum(d_lat, d_top), d_dome)


def lung_dist(anat: dict, side: int, x, y):
    """Signed depth inside the visible lung field (hemithorax minus heart and aortic knob)."""
    d = hemithorax_dist(anat, side, x, y)
    d = np.minimum(d, -heart_dist(anat, x, y))
    if side == 1:
        # aortic knob: a round bulge of the mediastinum into the upper image-right lung
        g = lung_geometry(anat, side)
        r = anat["knob"] + 0.02
        kd = r - np.sqrt((x - (g["medial"] - 0.01)) ** 2 + ((y - 0.30) / 1.3) ** 2)
        d = np.minimum(d, -kd)
    return d


def hilum(anat: dict, side: int) -> tuple[float, float]:
    """The hilum of one lung (vessels radiate from here)."""
    g = lung_geometry(anat, side)
    return 0.5 + g["s"] * (anat["lungs"][side]["xm"] + 0.07), 0.46
