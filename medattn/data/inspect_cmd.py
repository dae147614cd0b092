"""Check a ChestX-ray14 download: metadata counts, split lists, boxes, and (unless
--metadata-only) whether every image in the metadata is on disk and readable.

The metadata files are found by name (Data_Entry_2017_v2020.csv wins over Data_Entry_2017.csv;
.gz copies are read too) and fully validated: a malformed file stops with an error naming the
file and row (exit 2). Images are looked for in images_0NN/images/, images/ and the root.

--verify header (default) reads only the start and end of each PNG: signature, IHDR (size, bit
depth, colour type, CRC) and a final IEND chunk, which catches truncated downloads in seconds.
--verify full decodes every image with PIL in --workers processes (minutes for 112k images).
RGBA (R=G=B) images are converted to 8-bit gray and 16-bit ones scaled to 8 bit by `medattn
prepare`; both are counted here, as are images not 1024x1024.

Exit status: 0 all good; 1 images missing or unreadable (not with --metadata-only); 2 malformed
metadata or a bad root.

Examples:
  medattn inspect --nih-root /data/nih --metadata-only
  medattn inspect --nih-root /data/nih --verify full --workers 16 --json > inspect.json
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type, CRC
_COLOUR = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_FIRST = 10  # ids listed in the summary for missing images


def png_header(path: str | os.PathLike) -> dict[str, Any]:
    """Check a PNG cheaply: signature, IHDR (with CRC) and the final IEND chunk.

    Args:
        path: the PNG file.

    Returns:
        ``{"width", "height", "bit_depth", "colour_type", "mode"}`` (mode as PIL names it:
        ``L``, ``RGBA`` ...; ``;16`` appended for 16-bit).

    Raises:
        ValueError: with the reason the file is not a complete PNG.
        OSError: when it cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(33)
        if len(head) < 33:
            raise ValueError(f"too short for a PNG ({len(head)} bytes)")
        if head[:8] != PNG_SIGNATURE:
            raise ValueError("not a PNG (bad signature)")
        length, ctype = struct.unpack(">I4s", head[8:16])
        if ctype != b"IHDR" or length != 13:
            raise ValueError("first chunk is not a 13-byte IHDR")
        if zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]:
            raise ValueError("IHDR CRC mismatch (corrupt header)")
        width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
        if width == 0 or height == 0 or depth not in _BIT_DEPTHS.get(colour, ()):
            raise ValueError(f"invalid IHDR (size {width}x{height}, bit depth {depth}, colour type {colour})")
        f.seek(-12, os.SEEK_END)
        if f.read(12) != IEND_CHUNK:
            raise ValueError("truncated: the file does not end with an IEND chunk")
    mode = _COLOUR[colour] + (";16" if depth == 16 else "")
    return {"width": width, "height": height, "bit_depth": depth, "colour_type": colour, "mode": mode}


def _check_one(item: tuple[str, str, bool]) -> tuple[str, dict[str, Any] | None, str | None]:
    """(image, path, decode) -> (image, header info or None, reason or None). Runs in workers."""
    image, path, decode = item
    try:
        info = png_header(path)
        if decode:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                if im.size != (info["width"], info["height"]):
                    raise ValueError(f"decoded size {im.size} differs from the header")
        return image, info, None
    except (OSError, ValueError, SyntaxError, zlib.error) as e:  # PIL raises all of these
        return image, None, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the survey
        return image, None, f"{type(e).__name__}: {e}"


def verify_images(found: dict[str, Path], mode: str = "header", workers: int = 1) -> dict[str, Any]:
    """Check the given images.

    Args:
        found: image id -> path.
        mode: ``header`` (threads, cheap) or ``full`` (PIL decode in ``workers`` processes).
        workers: parallelism.

    Returns:
        ``{"unreadable": [{"file", "reason"}...], "modes": {mode: n}, "rgba": n, "16bit": n,
        "not_1024": n}`` (unreadable sorted by file name).
    """
    names = sorted(found)
    decode = mode == "full"
    workers = max(1, int(workers))
    unreadable = []
    modes: dict[str, int] = {}
    rgba = sixteen = not_1024 = 0

    def tally(results) -> None:
        nonlocal rgba, sixteen, not_1024
        for image, info, reason in results:
            if info is None:
                unreadable.append({"file": str(found[image]), "reason": reason})
                continue
            modes[info["mode"]] = modes.get(info["mode"], 0) + 1
            rgba += info["colour_type"] == 6
            sixteen += info["bit_depth"] == 16
            not_1024 += (info["width"], info["height"]) != (1024, 1024)

    # In chunks, counted as they come: the results (and, with threads, the futures) of 112,120
    # films are never all held at once, so memory does not grow with the count.
    chunk = 4096
    chunks = ([(im, str(found[im]), decode) for im in names[k:k + chunk]] for k in range(0, len(names), chunk))
    if decode and workers > 1 and len(names) > 1:
        import multiprocessing as mp
        # spawn: the parent may hold threads (pyarrow, torch) that make fork unsafe.
        with mp.get_context("spawn").Pool(workers) as pool:
            for items in chunks:
                tally(pool.imap_unordered(_check_one, items, chunksize=max(1, min(256, len(items) // (4 * workers)))))
    elif workers > 1 and len(names) > 1:
        with ThreadPoolExecutor(workers) as ex:
            for items in chunks:
                tally(ex.map(_check_one, items))
    else:
        for items in chunks:
            tally(map(_check_one, items))
    unreadable.sort(key=lambda d: d["file"])
    return {"unreadable": unreadable, "modes": dict(sorted(modes.items())), "rgba": rgba, "16bit": sixteen,
            "not_1024": not_1024}


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nih-root", required=True, type=Path, metavar="DIR",
                   help="the ChestX-ray14 download (metadata CSVs, lists, image folders)")
    p.add_argument("--metadata-only", action="store_true", help="check the metadata files only, not the images")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the summary")
    p.add_argument("--verify", choices=("header", "full"), default="header",
                   help="header: signature, IHDR and IEND of each PNG (fast, default); full: decode every image")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="threads (header) or processes (full) for the image checks (default: all CPUs)")


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def inspect_root(root: Path, *, metadata_only: bool = False, verify: str = "header",
                 workers: int | None = None) -> dict[str, Any]:
    """Everything ``medattn inspect`` reports, as a JSON-ready dict (see the module docstring)."""
    from medattn.data.nih import find_images, load_nih

    meta = load_nih(root)
    e = meta.entries
    images = e["image"].tolist()
    patient_of = dict(zip(images, e["patient"].tolist()))
    root = Path(root)

    def rel(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    out: dict[str, Any] = {
        "nih_root": str(root),
        "variant": meta.variant,
        "files": {k: rel(v) for k, v in meta.files.items()},
        "images": len(e),
        "patients": int(e["patient"].nunique()),
        "train_val": None if meta.train_val is None else len(meta.train_val),
        "test": None if meta.test is None else len(meta.test),
        "train_val_patients": None if meta.train_val is None else len({patient_of[i] for i in meta.train_val}),
        "test_patients": None if meta.test is None else len({patient_of[i] for i in meta.test}),
        "unlisted": None,
        "chexnet": None if meta.chexnet is None else {k: len(v) for k, v in meta.chexnet.items()},
        "boxes": len(meta.boxes),
        "boxed_images": int(meta.boxes["image"].nunique()),
        "per_class": meta.per_class_counts(),
        "image_random": _image_random(meta),
    }
    if meta.train_val is not None and meta.test is not None:
        out["unlisted"] = len(e) - len(meta.train_val) - len(meta.test)
    if metadata_only:
        out["ok"] = True
        return out

    found = find_images(root)
    present = {im: found[im] for im in images if im in found}
    missing = [im for im in images if im not in found]
    checks = verify_images(present, verify, workers or _default_workers())
    out.update({
        "verify": verify,
        "images_found": len(present),
        "extra_images": len(found) - len(present),
        "missing_images": {"count": len(missing), "first": missing[:_FIRST]},
        "unreadable": {"count": len(checks["unreadable"]), "files": checks["unreadable"]},
        "modes": checks["modes"],
        "rgba": checks["rgba"],
        "16bit": checks["16bit"],
        "not_1024": checks["not_1024"],
    })
    out["ok"] = not missing and not checks["unreadable"]
    return out


def _image_random(meta) -> dict[str, Any]:
    """What ``prepare --split image-random`` (70/10/20 of the images, seed 0) would do to patients."""
    from medattn.data.splits import make_split, split_summary

    split = make_split(meta, "image-random", seed=0)
    summary = split_summary(meta.entries, split)
    return {"seed": 0, "images": {p: v["images"] for p, v in summary.items()},
            "patients": int(meta.entries["patient"].nunique()),
            "patients_crossing": int(split.attrs["patients_crossing"])}


def _n(x: int | None) -> str:
    return "absent" if x is None else f"{x:,}"


def format_summary(r: dict[str, Any]) -> str:
    """The human-readable summary of an :func:`inspect_root` result."""
    f = r["files"]
    lines = [f"ChestX-ray14 at {r['nih_root']}",
             f"  metadata    {f['entries']} (variant {r['variant']})"
             + (f"; ignored {f['entries_ignored']}" if f.get("entries_ignored") else ""),
             f"  boxes       {f['boxes'] or 'absent'}",
             f"  lists       {f['train_val'] or 'train_val_list.txt absent'}, {f['test'] or 'test_list.txt absent'}",
             f"  chexnet     {f['chexnet'] or 'absent'}",
             f"images {r['images']:,}   patients {r['patients']:,}",
             f"official split: train_val {_n(r['train_val'])} images ({_n(r['train_val_patients'])} patients), "
             f"test {_n(r['test'])} images ({_n(r['test_patients'])} patients)"
             + (f", in neither list {r['unlisted']:,}" if r.get("unlisted") else "")]
    if r["chexnet"]:
        c = r["chexnet"]
        lines.append(f"chexnet split: train {c['train']:,}, val {c['val']:,}, test {c['test']:,}")
    ir = r.get("image_random")
    if ir:
        im = ir["images"]
        lines.append(f"image-random split (70/10/20 of images, seed {ir['seed']}): train {im.get('train', 0):,}, "
                     f"val {im.get('val', 0):,}, test {im.get('test', 0):,} images; "
                     f"{ir['patients_crossing']:,} of {ir['patients']:,} patients would have images in more than "
                     "one part (patient leakage)")
    lines.append(f"boxes {r['boxes']:,} on {r['boxed_images']:,} images")
    lines.append("images per class:")
    width = max(map(len, r["per_class"]))
    lines += [f"  {name:<{width}}  {n:>7,}" for name, n in r["per_class"].items()]
    if "images_found" in r:
        miss, bad = r["missing_images"], r["unreadable"]
        lines.append(f"images on disk (verify {r['verify']}): found {r['images_found']:,} of {r['images']:,}"
                     + (f", plus {r['extra_images']:,} PNGs not in the metadata" if r["extra_images"] else ""))
        if miss["count"]:
            lines.append(f"  missing {miss['count']:,} (first: {', '.join(miss['first'])})")
        if bad["count"]:
            lines.append(f"  unreadable {bad['count']:,}:")
            lines += [f"    {u['file']}: {u['reason']}" for u in bad["files"][:50]]
            if bad["count"] > 50:
                lines.append(f"    ... and {bad['count'] - 50:,} more (see --json)")
        lines.append(f"  modes {', '.join(f'{k} {v:,}' for k, v in r['modes'].items()) or 'none'}; "
                     f"prepare converts RGBA->L {r['rgba']:,}, 16-bit->8-bit {r['16bit']:,}, "
                     f"resizes non-1024x1024 {r['not_1024']:,}")
        if r["ok"]:
            lines.append("OK: every image in the metadata is present and readable")
        else:
            lines.append(f"FAILED: {miss['count']:,} image(s) missing and {bad['count']:,} unreadable "
                         f"(exit status 1; use --metadata-only to check the metadata alone)")
            if miss["count"] and r["images_found"]:
                # A partial download (some images_0xx archives only) is still usable: prepare can
                # leave the missing images out instead of stopping at the first one.
                lines.append(f"  a partial download? `medattn prepare --allow-missing ...` prepares the "
                             f"{r['images_found']:,} images present and leaves the missing ones out (counted)")
    else:
        lines.append("OK: metadata is well-formed (images not checked: --metadata-only)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = inspect_root(args.nih_root, metadata_only=args.metadata_only, verify=args.verify,
                          workers=args.workers)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print(format_summary(result))
    return 0 if result["ok"] else 1
