"""Rasteriser of the synthetic ChestX-ray14: anatomy + lesions -> 8-bit image, lung mask, boxes.

Smooth structures are drawn at an internal resolution ``R = min(S, 512)`` with vectorised
numpy (lesions only inside their own window), then upsampled to ``S`` and given film grain at
full resolution. Every random draw comes from the image's own generator, so an image depends
only on (seed, image index) and never on which worker drew it.

Grey levels: air ~15, soft tissue ~140-210, aerated lung ~70-100. Opacities blend the pixel
towards "water" (the soft-tissue level), lucencies towards air; both are visible only where
there is lung behind them, like on a real film.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from medattn.boxes import mask_bounds
from medattn.data._synth_anatomy import (SIDES, dome_y, half_width, heart_dist, hemithorax_dist, hilum,
                                         lung_dist, lung_geometry)

MAX_RENDER = 512   # internal resolution cap (the demo prepares at 256 px)
_THRESH = [0] * 128 + [255] * 128   # PIL point() table: bilinear-upsampled mask -> 0/255


def _soft(d, e):
    """Linear ramp 0 -> 1 over ``e`` around d = 0 (a cheap anti-aliased edge)."""
    return np.clip(0.5 + d / e, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with features ``cell`` pixels across (bicubic upsampled)."""
    gh = max(2, int(round(h / max(cell, 1.0))) + 2)
    gw = max(2, int(round(w / max(cell, 1.0))) + 2)
    a = rng.standard_normal((gh, gw), dtype=np.float32)
    n = np.asarray(Image.fromarray(a, "F").resize((max(w, 1), max(h, 1)), Image.BICUBIC))
    sd = float(n.std())
    return (n - float(n.mean())) / (sd if sd > 1e-6 else 1.0)


class Canvas:
    """The pixel grid at resolution R and its map into body coordinates.

    Args:
        R: internal resolution.
        jitter: dict with ``tx, ty`` (shift), ``sc`` (scale) and ``rot`` (radians).
    """

    def __init__(self, R: int, jitter: dict):
        self.R = R
        self.tx, self.ty, self.sc, self.rot = jitter["tx"], jitter["ty"], jitter["sc"], jitter["rot"]
        c = (np.arange(R, dtype=np.float32) + 0.5) / R
        du = c[None, :] - 0.5 - self.tx
        dv = c[:, None] - 0.5 - self.ty
        cs, sn = math.cos(self.rot), math.sin(self.rot)
        self.X = (0.5 + (cs * du + sn * dv) / self.sc).astype(np.float32)
        self.Y = (0.5 + (-sn * du + cs * dv) / self.sc).astype(np.float32)
        self.e = 1.6 / (R * self.sc)          # edge width in body units (~1.6 px)

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """Body point -> image point (both in [0, 1] units)."""
        cs, sn = math.cos(self.rot), math.sin(self.rot)
        return (0.5 + self.tx + self.sc * (cs * (x - 0.5) - sn * (y - 0.5)),
                0.5 + self.ty + self.sc * (sn * (x - 0.5) + cs * (y - 0.5)))

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Pixel rows/cols covering the body rectangle [x0, x1] x [y0, y1] (plus 2 px)."""
        pts = [self.to_image(x, y) for x in (x0, x1) for y in (y0, y1)]
        us = [p[0] for p in pts]
        vs = [p[1] for p in pts]
        R = self.R
        c0 = max(0, int(math.floor(min(us) * R)) - 2)
        c1 = min(R, int(math.ceil(max(us) * R)) + 2)
        r0 = max(0, int(math.floor(min(vs) * R)) - 2)
        r1 = min(R, int(math.ceil(max(vs) * R)) + 2)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def xy(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.X[win], self.Y[win]


def _box_of(win: tuple[slice, slice], extent: np.ndarray, R: int) -> tuple[float, float, float, float] | None:
    """Image-normalised (u0, v0, u1, v1) of the True pixels of ``extent`` inside ``win``."""
    b = mask_bounds(extent)
    if b is None:
        return None
    r0, c0 = win[0].start, win[1].start
    return ((c0 + b[0]) / R, (r0 + b[1]) / R, (c0 + b[2]) / R, (r0 + b[3]) / R)


# --------------------------------------------------------------------------- lesions
# Each function returns a list of layers (window, alpha, kind) and the lesion's extent box.
# kind: "opaque" blends towards water, "calcified" towards bone (brighter than soft tissue),
# "lucent" towards air, "gas" towards gas (also over soft tissue), "add" adds alpha grey levels.

def _lung_soft(anat, X, Y, e, side=None):
    if side is None:
        return np.maximum(_soft(lung_dist(anat, 0, X, Y), e), _soft(lung_dist(anat, 1, X, Y), e))
    return _soft(lung_dist(anat, side, X, Y), e)


def _nodule(cv, anat, les, rng):
    layers, boxes = [], []
    for sp in les["spots"]:
        r = sp["r"]
        win = cv.window(sp["x"] - r, sp["x"] + r, sp["y"] - r, sp["y"] + r)
        X, Y = cv.xy(win)
        d2 = ((X - sp["x"]) ** 2 + (Y - sp["y"]) ** 2) / (r * r)
        a = les["dens"] * np.clip(1.0 - d2, 0.0, 1.0) ** 0.3
        # calcified (granuloma-like): brighter than soft tissue, which also sets it apart from a mass
        layers.append((win, a, "calcified"))
        boxes.append(_box_of(win, d2 < 1.0, cv.R))
    return layers, boxes


def _mass(cv, anat, les, rng):
    r = les["r"] * 1.15
    win = cv.window(les["x"] - r, les["x"] + r, les["y"] - r, les["y"] + r)
    X, Y = cv.xy(win)
    dx, dy = (X - les["x"]) / les["ecc"], (Y - les["y"]) * les["ecc"]
    th = np.arctan2(dy, dx)
    rr = les["r"] * (1.0 + les["lob"][0] * np.sin(2 * th + les["ph"][0]) + les["lob"][1] * np.sin(3 * th + les["ph"][1]))
    d = np.sqrt(dx * dx + dy * dy) / rr
    tex = smooth_noise(rng, X.shape[0], X.shape[1], max(2.0, 0.012 * cv.R))
    a = les["dens"] * np.clip((1.0 - d) / 0.15, 0.0, 1.0) * (0.92 + 0.08 * tex)
    return [(win, np.clip(a, 0, 1), "opaque")], _box_of(win, d < 1.0, cv.R)


def _cardiomegaly(cv, anat, les, rng):
    h = anat["heart"]
    ext = max(h["hx"], h["hy"]) * 1.05
    win = cv.window(h["cx"] - ext, h["cx"] + ext, h["cy"] - ext, h["cy"] + ext)
    X, Y = cv.xy(win)
    g0, g1 = lung_geometry(anat, 0), lung_geometry(anat, 1)
    floor = np.where(X < 0.5, dome_y(g0, X), dome_y(g1, X)) + 0.01
    ext_mask = (heart_dist(anat, X, Y) > 0) & (Y < floor)
    return [], _box_of(win, ext_mask, cv.R)


def _parts(draw_one, cv, anat, les, key):
    """Draw each part of a lesion (``les[key]``, sharing its density); one box per part."""
    layers, boxes = [], []
    for part in les[key]:
        lay, box = draw_one(cv, anat, dict(part, dens=les["dens"]))
        layers.extend(lay)
        boxes.append(box)
    return layers, boxes


def _effusion(cv, anat, les, rng):
    return _parts(_effusion_side, cv, anat, les, "sides")   # one side, or both


def _effusion_side(cv, anat, les):
    g = lung_geometry(anat, les["side"])
    top = g["cp"] - les["h"] - les["men"] - 0.02
    win = cv.window(min(g["lateral"], g["medial"]), max(g["lateral"], g["medial"]), top, g["cp"] + 0.02)
    X, Y = cv.xy(win)
    t = np.clip((X - g["medial"]) / (g["lateral"] - g["medial"]), 0.0, 1.0)
    level = g["cp"] - les["h"] - les["men"] * t * t
    inside = np.minimum(half_width(g, Y) - np.abs(X - g["cx"]), g["cp"] + 0.01 - Y)
    a = les["dens"] * _soft(Y - level, 0.012) * _soft(inside, cv.e) * (0.85 + 0.15 * np.clip((Y - level) / 0.05, 0, 1))
    a = a * _soft(-heart_dist(anat, X, Y), cv.e)
    visible = (a > 0.35 * les["dens"]) & (hemithorax_dist(anat, les["side"], X, Y) > -0.004)
    return [(win, a, "opaque")], _box_of(win, visible, cv.R)


def _ptx_fields(anat, les, X, Y):
    side = les["side"]
    hx, hy = hilum(anat, side)
    k = les["k"]
    d_out = hemithorax_dist(anat, side, X, Y)
    d_in = hemithorax_dist(anat, side, hx + (X - hx) / k, hy + (Y - hy) / k) * k
    return d_out, d_in


def _pneumothorax(cv, anat, les, rng):
    g = lung_geometry(anat, les["side"])
    x0, x1 = min(g["lateral"], g["medial"]), max(g["lateral"], g["medial"])
    win = cv.window(x0, x1, g["top"], les["ylim"] + 0.02)
    X, Y = cv.xy(win)
    d_out, d_in = _ptx_fields(anat, les, X, Y)
    fade = np.clip((les["ylim"] - Y) / 0.05, 0.0, 1.0)
    outer = _soft(np.minimum(d_out, -heart_dist(anat, X, Y)), cv.e)
    region = outer * _soft(-d_in, cv.e) * fade
    line = np.exp(-(d_in / 0.004) ** 2) * outer * fade
    extent = (d_out > 0) & (d_in < 0) & (Y < les["ylim"] - 0.01)
    return [(win, les["dark"] * region, "lucent"), (win, les["line"] * line, "add")], _box_of(win, extent, cv.R), \
        (win, region)


def _atelectasis(cv, anat, les, rng):
    side = les["side"]
    if les["kind"] == "band":
        L = les["len"] / 2
        win = cv.window(les["x"] - L, les["x"] + L, les["y"] - L, les["y"] + L)
        X, Y = cv.xy(win)
        cs, sn = math.cos(les["ang"]), math.sin(les["ang"])
        p = (cs * (X - les["x"]) + sn * (Y - les["y"])) / L
        q = (-sn * (X - les["x"]) + cs * (Y - les["y"])) / (les["t"] / 2)
        f = p ** 4 + q * q
        a = les["dens"] * np.clip((1.0 - f) / 0.35, 0.0, 1.0)
    else:
        g = lung_geometry(anat, side)
        ax, ay = les["apex"]
        b1 = (g["cx"] + g["s"] * float(half_width(g, les["y1"])) + 0.01 * g["s"], les["y1"])
        b2 = (g["cx"] + g["s"] * float(half_width(g, les["y2"])) + 0.01 * g["s"], les["y2"])
        xs, ys = (ax, b1[0], b2[0]), (ay, b1[1], b2[1])
        win = cv.window(min(xs), max(xs), min(ys), max(ys))
        X, Y = cv.xy(win)
        dmin = None
        pts = [(ax, ay), b1, b2]
        cxm, cym = sum(xs) / 3, sum(ys) / 3
        for i in range(3):
            (px, py), (qx, qy) = pts[i], pts[(i + 1) % 3]
            nx, ny = qy - py, -(qx - px)
            nl = math.hypot(nx, ny)
            nx, ny = nx / nl, ny / nl
            if nx * (cxm - px) + ny * (cym - py) < 0:   # normal pointing inside
                nx, ny = -nx, -ny
            d = nx * (X - px) + ny * (Y - py)
            dmin = d if dmin is None else np.minimum(dmin, d)
        a = les["dens"] * np.clip(dmin / 0.008, 0.0, 1.0)
    a = a * _soft(hemithorax_dist(anat, side, X, Y), cv.e)
    return [(win, a, "opaque")], _box_of(win, a > 0.35 * les["dens"], cv.R)


def _infiltration(cv, anat, les, rng):
    rx, ry = les["rx"], les["ry"]
    win = cv.window(les["x"] - rx, les["x"] + rx, les["y"] - ry, les["y"] + ry)
    X, Y = cv.xy(win)
    env = np.clip(1.0 - ((X - les["x"]) / rx) ** 2 - ((Y - les["y"]) / ry) ** 2, 0.0, 1.0) ** 0.5
    n = smooth_noise(rng, X.shape[0], X.shape[1], les["cell"] * cv.R * cv.sc)
    patches = np.clip((n + 0.3) / 0.7, 0.0, 1.0)
    a = les["dens"] * env * patches * _lung_soft(anat, X, Y, cv.e)
    return [(win, a, "opaque")], _box_of(win, a > 0.3 * les["dens"], cv.R)


def _pneumonia(cv, anat, les, rng):
    r = les["r"] * 1.2
    win = cv.window(les["x"] - r * les["ecc"], les["x"] + r * les["ecc"], les["y"] - r / les["ecc"], les["y"] + r / les["ecc"])
    X, Y = cv.xy(win)
    d = np.sqrt(((X - les["x"]) / (les["r"] * les["ecc"])) ** 2 + ((Y - les["y"]) * les["ecc"] / les["r"]) ** 2)
    n = smooth_noise(rng, X.shape[0], X.shape[1], 0.03 * cv.R)
    env = np.clip((1.12 - d + 0.15 * n) / 0.4, 0.0, 1.0)
    # air bronchograms: dark tubes running out from the hilum through the opacity
    hx, hy = hilum(anat, les["side"])
    dx, dy = X - hx, Y - hy
    tubes = np.clip(1.0 - np.abs(np.cos(les["m"] * np.arctan2(dy, dx) + 8.0 * np.sqrt(dx * dx + dy * dy) + les["ph"])) / 0.3,
                    0.0, 1.0)
    a = les["dens"] * env * (0.9 + 0.1 * n) * (1.0 - 0.6 * tubes * np.clip((0.85 - d) / 0.3, 0.0, 1.0))
    a = np.clip(a * _lung_soft(anat, X, Y, cv.e), 0.0, 1.0)
    return [(win, a, "opaque")], _box_of(win, a > 0.35 * les["dens"], cv.R)


def _consolidation(cv, anat, les, rng):
    side = les["side"]
    g = lung_geometry(anat, side)
    x0, x1 = min(g["lateral"], g["medial"]), max(g["lateral"], g["medial"])
    if les["kind"] == "upper":
        win = cv.window(x0, x1, g["top"], les["yf"] + 0.06)
    else:
        win = cv.window(x0, x1, les["yf"] - 0.06, g["cp"] + 0.01)
    X, Y = cv.xy(win)
    fissure = les["yf"] + les["slope"] * (X - g["cx"])
    edge = _soft(fissure - Y, 0.006) if les["kind"] == "upper" else _soft(Y - fissure, 0.006)
    n = smooth_noise(rng, X.shape[0], X.shape[1], 0.02 * cv.R)
    a = les["dens"] * edge * (0.9 + 0.1 * n) * _lung_soft(anat, X, Y, cv.e, side)
    return [(win, np.clip(a, 0, 1), "opaque")], None


def _edema(cv, anat, les, rng):
    out = []
    for side in SIDES:
        hx, hy = hilum(anat, side)
        g = lung_geometry(anat, side)
        win = cv.window(min(g["lateral"], g["medial"]), max(g["lateral"], g["medial"]), g["top"], g["cp"])
        X, Y = cv.xy(win)
        q = ((X - hx) / les["sx"]) ** 2 + ((Y - hy) / les["sy"]) ** 2
        a = les["dens"] * (np.exp(-q) + 0.12) * _lung_soft(anat, X, Y, cv.e, side)
        out.append((win, a, "opaque"))
    return out, None


def _emphysema(cv, anat, les, rng):
    out = []
    for bx, by, r in les["bullae"]:
        win = cv.window(bx - r, bx + r, by - r, by + r)
        X, Y = cv.xy(win)
        d = np.sqrt((X - bx) ** 2 + (Y - by) ** 2) / r
        out.append((win, 0.45 * np.clip((1.0 - d) / 0.1, 0.0, 1.0) * _lung_soft(anat, X, Y, cv.e), "lucent"))
        out.append((win, 18.0 * np.exp(-((d - 1.0) / 0.08) ** 2) * _lung_soft(anat, X, Y, cv.e), "add"))
    return out, None


def _fibrosis(cv, anat, les, rng):
    out = []
    sp = les["sp"]
    for side in les["sides"]:
        g = lung_geometry(anat, side)
        win = cv.window(min(g["lateral"], g["medial"]), max(g["lateral"], g["medial"]), les["y0"] - 0.04, g["cp"])
        X, Y = cv.xy(win)
        h, w = X.shape
        cell = 2.5 * sp * cv.R
        xd = X / sp + 0.35 * smooth_noise(rng, h, w, cell)
        yd = Y / sp + 0.35 * smooth_noise(rng, h, w, cell)
        gx = np.abs(np.sin(np.pi * xd))
        gy = np.abs(np.sin(np.pi * yd))
        lines = np.clip(1.0 - np.minimum(gx, gy) / 0.6, 0.0, 1.0)
        ld = lung_dist(anat, side, X, Y)
        periph = np.clip(1.15 - ld / 0.08, 0.45, 1.0)
        a = les["dens"] * lines * periph * _soft(ld, cv.e) * _soft(Y - les["y0"], 0.05)
        out.append((win, a, "opaque"))
    return out, None


def _pleural_thickening(cv, anat, les, rng):
    return _parts(_pleural_band, cv, anat, les, "bands")


def _pleural_band(cv, anat, les):
    side = les["side"]
    g = lung_geometry(anat, side)
    x0, x1 = min(g["lateral"], g["medial"]), max(g["lateral"], g["medial"])
    win = cv.window(x0 - 0.01, x1 + 0.01, les["y0"] - 0.02, les["y1"] + 0.02)
    X, Y = cv.xy(win)
    hd = hemithorax_dist(anat, side, X, Y)
    band = np.clip(1.0 - hd / les["t"], 0.0, 1.0) ** 0.5 * _soft(hd + 0.004, cv.e)
    span = np.clip(np.minimum(Y - les["y0"], les["y1"] - Y) / 0.03, 0.0, 1.0)
    if les["kind"] == "lateral":
        span = span * np.clip(((X - g["cx"]) * g["s"] / g["a"] - 0.15) / 0.2, 0.0, 1.0)
    a = les["dens"] * band * span * _soft(-heart_dist(anat, X, Y), cv.e)
    # a calcified plaque: brighter than the soft tissue of the chest wall beside it
    return [(win, a, "calcified")], _box_of(win, a > 0.35 * les["dens"], cv.R)


def _hernia(cv, anat, les, rng):
    r = les["r"]
    win = cv.window(les["x"] - r * 1.1, les["x"] + r * 1.1, les["y"] - r * 1.1, les["y"] + r * 1.1)
    X, Y = cv.xy(win)
    d = np.sqrt((X - les["x"]) ** 2 + (Y - les["y"]) ** 2) / r
    inner = np.clip((0.86 - d) / 0.06, 0.0, 1.0)
    level = les["y"] + les["level"] * r
    gas = inner * _soft(level - Y, 0.003)
    fluid = inner * _soft(Y - level, 0.003)
    wall = np.exp(-((d - 0.93) / 0.06) ** 2)
    return [(win, 0.9 * gas, "gas"), (win, 28.0 * fluid + 35.0 * wall, "add")], \
        _box_of(win, d < 1.0, cv.R)


LESION_DRAW = {
    "Nodule": _nodule, "Mass": _mass, "Cardiomegaly": _cardiomegaly, "Effusion": _effusion,
    "Atelectasis": _atelectasis, "Infiltration": _infiltration, "Pneumonia": _pneumonia,
    "Consolidation": _consolidation, "Edema": _edema, "Emphysema": _emphysema, "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening, "Hernia": _hernia,
}


# --------------------------------------------------------------------------- anatomy
def _smooth_layer(ch: Canvas, anat: dict) -> np.ndarray:
    """The slowly varying part of the chest (trunk, soft tissue, bones, breasts).

    Drawn on a half-resolution canvas and upsampled: none of it has edges sharper than a few
    pixels, and this is where most of the per-pixel work is.
    """
    X, Y = ch.X, ch.Y
    ax = np.abs(X - 0.5)
    # trunk: shoulders narrow towards the top; soft tissue is thickest at the midline
    bw = anat["bw"] * (0.86 + 0.14 * np.clip(Y / 0.16, 0.0, 1.0))
    trunk = _soft(bw - ax, 0.02)
    thick = np.sqrt(np.clip(1.0 - (ax / bw) ** 2, 0.0, 1.0))
    img = anat["air"] + trunk * (anat["t_edge"] - anat["air"] + (anat["t_center"] - anat["t_edge"]) * thick)
    lung = np.maximum(_soft(lung_dist(anat, 0, X, Y), 0.02), _soft(lung_dist(anat, 1, X, Y), 0.02))

    # ribs: posterior (arched) and fainter anterior (sloping down medially); seen mostly
    # against the lungs
    xs = np.maximum(ax - 0.03, 0.0)
    post = np.cos((2 * np.pi / anat["rib_sp"]) * (Y - anat["rib_c1"] * xs * xs + 0.3 * xs) + 2 * np.pi * anat["rib_off"])
    ant = np.cos((2 * np.pi / (1.25 * anat["rib_sp"])) * (Y + 0.5 * xs) + 4.4 * anat["rib_off"])
    ribzone = np.clip((Y - 0.07) / 0.05, 0.0, 1.0) * np.clip((0.8 - Y) / 0.06, 0.0, 1.0) * _soft(ax - 0.03, 0.02) * trunk
    ribs = (np.clip((post - 0.35) / 0.65, 0.0, 1.0) + 0.45 * np.clip((ant - 0.5) / 0.5, 0.0, 1.0)) * ribzone
    img += anat["rib_amp"] * ribs * (0.35 + 0.65 * lung)

    # clavicles: bands rising laterally from the sternal ends
    win = ch.window(0.0, 1.0, 0.0, 0.32)
    Xw, Yw = ch.xy(win)
    aw = np.abs(Xw - 0.5)
    yc = anat["clav_y"] - anat["clav_slope"] * (aw - 0.06)
    clav = np.exp(-((Yw - yc) / 0.013) ** 2) * np.clip((aw - 0.045) / 0.02, 0.0, 1.0) * np.clip((0.36 - aw) / 0.03, 0.0, 1.0)
    img[win] += 30.0 * clav

    # spine (vertebral bodies faintly periodic)
    img += 14.0 * _soft(0.035 - ax, 0.01) * (0.8 + 0.2 * np.cos((2 * np.pi / 0.055) * Y)) * trunk

    if anat["breast"] > 0:
        for side in SIDES:
            g = lung_geometry(anat, side)
            bx = g["cx"] + g["s"] * 0.35 * g["a"]
            win = ch.window(bx - 0.16, bx + 0.16, 0.58, 0.82)
            Xw, Yw = ch.xy(win)
            q = ((Xw - bx) / 0.16) ** 2 + ((Yw - 0.7) / 0.12) ** 2
            img[win] += anat["breast"] * np.sqrt(np.clip(1.0 - q, 0.0, 1.0))
    return img


def _draw_anatomy(cv: Canvas, half: Canvas, anat: dict, rng: np.random.Generator, no_marks: list
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Grey-level image of the normal chest at R x R and the soft lung mask."""
    X, Y = cv.X, cv.Y
    R = cv.R
    base = _smooth_layer(half, anat)
    img = np.array(Image.fromarray(base.astype(np.float32), "F").resize((R, R), Image.BILINEAR))

    # lung fields (sharp edges, full resolution), each only inside its hemithorax window
    lung = np.zeros_like(X)
    for side in SIDES:
        g = lung_geometry(anat, side)
        win = cv.window(min(g["lateral"], g["medial"]) - 0.01, max(g["lateral"], g["medial"]) + 0.01,
                        g["top"] - 0.01, g["cp"] + 0.01)
        Xw, Yw = cv.xy(win)
        d = lung_dist(anat, side, Xw, Yw)
        soft = _soft(d, cv.e)
        lung[win] = np.maximum(lung[win], soft)
        # aerated lung: darkest in the middle of each field, lighter at the apex and edges
        prof = (0.74 + 0.26 * np.clip(d / 0.06, 0.0, 1.0)) * (0.8 + 0.2 * np.clip((Yw - g["top"]) / 0.12, 0.0, 1.0))
        img[win] -= soft * anat["depth"] * prof

        # vessels: wavy lines fanning out from the hilum, thinning towards the periphery
        hx, hy = hilum(anat, side)
        dx, dy = Xw - hx, Yw - hy
        r2 = dx * dx + dy * dy
        rho = np.sqrt(r2)
        th = np.arctan2(dy, dx)
        h, w = Xw.shape
        wob = smooth_noise(rng, h, w, 0.08 * R)
        ves = np.zeros_like(Xw)
        for _ in range(2):
            m = rng.uniform(13.0, 19.0)
            c = np.cos(m * th + rng.uniform(-12.0, 12.0) * rho + 1.3 * wob + rng.uniform(0, 6.3))
            ves = np.maximum(ves, np.clip(1.0 - np.abs(c) / 0.3, 0.0, 1.0))
        taper = np.exp(-rho / 0.22) * (0.5 + 0.5 * np.clip((rho - 0.02) / 0.04, 0.0, 1.0))
        marks = (1.4 * anat["mark_amp"]) * ves * taper + 24.0 * np.exp(-r2 / 0.0018)   # + hilar shadow
        for nwin, region in no_marks:   # no lung markings in a pneumothorax
            marks = marks * (1.0 - _crop(region, nwin, win))
        img[win] += soft * marks

    # trachea: a dark air column in the upper mediastinum
    win = cv.window(0.47, 0.53, 0.0, 0.34)
    Xw, Yw = cv.xy(win)
    img[win] -= 34.0 * _soft(0.013 - np.abs(Xw - 0.5), 0.004) * np.clip((0.3 - Yw) / 0.03, 0.0, 1.0)

    if anat["gastric"]:   # gastric air bubble under the image-right dome
        g = lung_geometry(anat, 1)
        r = anat["gastric_r"]
        gx = g["dc"] + 0.03
        gy = float(dome_y(g, gx)) + r + 0.015
        win = cv.window(gx - 1.6 * r, gx + 1.6 * r, gy - r, gy + r)
        Xw, Yw = cv.xy(win)
        q = ((Xw - gx) / (1.6 * r)) ** 2 + ((Yw - gy) / r) ** 2
        img[win] -= 60.0 * np.clip((1.0 - q) / 0.25, 0.0, 1.0)
    return img, lung


def _crop(region: np.ndarray, rwin: tuple[slice, slice], win: tuple[slice, slice]) -> np.ndarray:
    """``region`` (defined on window ``rwin``) resampled onto window ``win``, zero elsewhere."""
    out = np.zeros((win[0].stop - win[0].start, win[1].stop - win[1].start), np.float32)
    r0, r1 = max(rwin[0].start, win[0].start), min(rwin[0].stop, win[0].stop)
    c0, c1 = max(rwin[1].start, win[1].start), min(rwin[1].stop, win[1].stop)
    if r1 > r0 and c1 > c0:
        out[r0 - win[0].start:r1 - win[0].start, c0 - win[1].start:c1 - win[1].start] = \
            np.clip(region[r0 - rwin[0].start:r1 - rwin[0].start, c0 - rwin[1].start:c1 - rwin[1].start], 0.0, 1.0)
    return out


def render(job: dict) -> tuple[np.ndarray, np.ndarray, dict[str, list[tuple[float, float, float, float]]]]:
    """Draw one image.

    Args:
        job: ``seed``, ``index`` (the image's RNG key), ``size`` (S), ``anat`` (this image's
            anatomy), ``lesions`` (from ``plan_findings``), ``view`` ("PA"/"AP").

    Returns:
        (image S x S uint8, lung mask S x S uint8 with 255 = lung, boxes by label: a list of
        image-normalised (u0, v0, u1, v1), one per drawn part, e.g. per nodule).
    """
    S = int(job["size"])
    R = min(S, MAX_RENDER)
    rng = np.random.default_rng([int(job["seed"]), 7, int(job["index"])])
    jit = {"tx": rng.uniform(-0.02, 0.02), "ty": rng.uniform(-0.02, 0.02),
           "sc": rng.uniform(0.96, 1.03), "rot": rng.uniform(-0.03, 0.03)}
    cv = Canvas(R, jit)
    half = Canvas(max(R // 2, 32), jit)
    anat = job["anat"]

    layers: list = []
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    no_marks: list = []
    for les in job["lesions"]:
        lrng = np.random.default_rng(les["seed"])   # texture follows the lesion over follow-ups
        if les["cls"] == "Pneumothorax":
            lay, box, nm = _pneumothorax(cv, anat, les, lrng)
            no_marks.append(nm)
        else:
            lay, box = LESION_DRAW[les["cls"]](cv, anat, les, lrng)
        layers.extend(lay)
        found = [b for b in (box if isinstance(box, list) else [box]) if b is not None]
        if found:
            boxes[les["cls"]] = found

    img, lung = _draw_anatomy(cv, half, anat, rng, no_marks)
    water = anat["t_center"] - rng.uniform(5.0, 20.0)
    dark = anat["air"] + rng.uniform(20.0, 32.0)
    calc = min(water + 45.0, 250.0)
    for win, a, kind in layers:
        sub = img[win]
        if kind == "opaque":
            sub += a * np.maximum(water - sub, 0.0)
        elif kind == "calcified":
            sub += a * np.maximum(calc - sub, 0.0)
        elif kind == "lucent":
            sub += a * np.minimum(dark - sub, 0.0)
        elif kind == "gas":
            sub += a * (dark + 15.0 - sub)
        else:
            sub += a

    # side marker (a thin "L" in a top corner) on some films; kept thin and faint so that it
    # does not look like a nodule to a small CNN
    if rng.uniform() < 0.3:
        u0 = rng.uniform(0.04, 0.12) if rng.uniform() < 0.5 else rng.uniform(0.82, 0.9)
        v0 = rng.uniform(0.03, 0.1)
        c0, r0, k = int(u0 * R), int(v0 * R), max(1, R // 200)
        img[r0:r0 + 12 * k, c0:c0 + k] = 170.0
        img[r0 + 11 * k:r0 + 12 * k, c0:c0 + 7 * k] = 170.0

    # film response: gamma, contrast, brightness; AP films are a little flatter
    gamma = rng.uniform(0.94, 1.06)
    contrast = rng.uniform(0.96, 1.03) * (0.97 if job.get("view") == "AP" else 1.0)
    bright = rng.uniform(-5.0, 5.0)
    img = 255.0 * np.power(np.clip(img, 0.0, 255.0) / 255.0, gamma) * contrast + bright
    img += 3.0 * smooth_noise(rng, R, R, 0.3 * R)   # exposure non-uniformity

    # upsample in 8 bit (PIL, fast), then film grain at full resolution: a triangular
    # distribution from two random byte planes is much cheaper than Gaussian draws
    img8 = Image.fromarray(np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8), "L")
    mask8 = Image.fromarray(np.where(lung >= 0.5, 255, 0).astype(np.uint8), "L")
    if S != R:
        img8 = img8.resize((S, S), Image.BILINEAR)
        mask8 = mask8.resize((S, S), Image.BILINEAR).point(_THRESH)
    sigma = rng.uniform(1.6, 2.6)
    raw = np.frombuffer(rng.bytes(2 * S * S), dtype=np.uint8).reshape(2, S, S)
    grain = raw[0].astype(np.int16) + raw[1].astype(np.int16) - 255          # std ~104
    grain = (grain * int(round(sigma / 104.0 * 256))) >> 8
    out = np.clip(np.asarray(img8, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    mask = np.asarray(mask8)
    return out, mask, boxes
