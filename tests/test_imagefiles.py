"""medattn.data.imagefiles: arbitrary PNG / JPEG / DICOM files read into the pixels prepare makes.

Every file is written here, in tmp_path, from one 8-bit gray array: PNGs with PIL, DICOMs with
pydicom's Dataset / FileMetaDataset API (Explicit VR Little Endian, Digital X-Ray or Secondary
Capture). The lossless ones must come back byte-identical to what prepare's decoder makes of the
8-bit PNG."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medattn.data._images import resize
from medattn.data.imagefiles import ImageFileError, ImageWarning, expand_inputs, load_image, read_image
from medattn.errors import DataError, MissingDependencyError

S = 32                      # the prepared side
H, W = 64, 72               # the source: not square, so every read goes through the resize (and
                            # no smaller than 64 px, which read_image would warn about)

needs_pydicom = pytest.mark.skipif(importlib.util.find_spec("pydicom") is None,
                                   reason="pydicom not installed (pip install 'medattn[dicom]')")


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """(H, W) uint8 spanning 0..255: a gradient with noise, and the two extremes."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:H, 0:W]
    a = (x * 255 // (W - 1) + rng.integers(-40, 41, (H, W))).clip(0, 255)
    a[0, 0], a[-1, -1] = 0, 255
    return a.astype(np.uint8)


@pytest.fixture(scope="module")
def expected(gray) -> np.ndarray:
    """What prepare stores for the 8-bit gray image."""
    return resize(gray[..., None], S)


def _png(path, arr, mode=None):
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def write_dicom(path, pixels, *, photometric="MONOCHROME2", bits_stored=8, signed=False, window=None,
                rescale=None, voi_lut=None, frames=None, transfer_syntax=None, pixel_data=None,
                file_format=True, sop="dx"):
    """A single-frame DICOM holding ``pixels`` ((H, W) or (H, W, 3) stored values) as written."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian,
                             SecondaryCaptureImageStorage, generate_uid)

    sop_class = DigitalXRayImageStorageForPresentation if sop == "dx" else SecondaryCaptureImageStorage
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX" if sop == "dx" else "OT"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        lut, depth = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(lut), 0, depth]
        item.LUTData = [int(v) for v in lut]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = [item]
    if frames is not None:
        ds.NumberOfFrames = frames
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = pixel_data if pixel_data is not None else np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 or transfer_syntax else "OW"
    if not file_format:  # a bare dataset: no preamble, no meta header (some old .dcm files)
        ds.save_as(path, implicit_vr=True, little_endian=True)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds.file_meta = meta
    if transfer_syntax:
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


# ---------------------------------------------------------------- lossless: identical pixels
def test_png_variants_match_prepare(tmp_path, gray, expected):
    png8 = _png(tmp_path / "g8.png", gray)
    assert np.array_equal(load_image(png8, S, 1, None).pixels, expected)  # the reference is prepare's
    png16 = _png(tmp_path / "g16.png", gray.astype(np.uint16) * 257)
    assert Image.open(png16).mode.startswith("I;16")
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    pal = Image.fromarray(gray, "P")
    pal.putpalette([i for i in range(256) for _ in range(3)])  # a gray palette
    pal.save(tmp_path / "p.png")
    cases = {"png8": png8, "png16": png16, "rgba": _png(tmp_path / "rgba.png", rgba, "RGBA"),
             "rgb": _png(tmp_path / "rgb.png", rgba[..., :3], "RGB"),
             "la": _png(tmp_path / "la.png", rgba[..., 2:], "LA"), "p": tmp_path / "p.png"}
    assert Image.open(cases["p"]).mode == "P" and Image.open(cases["la"]).mode == "LA"
    for name, path in cases.items():
        out = read_image(path, S)
        assert out.dtype == np.uint8 and out.shape == (S, S, 1), name
        assert np.array_equal(out, expected), name
        assert np.array_equal(read_image(path, S, channels=3), np.repeat(expected, 3, axis=2)), name


def test_jpeg_close_but_lossy(tmp_path, gray, expected):
    path = tmp_path / "g.jpg"
    Image.fromarray(gray).save(path, quality=100)
    out = read_image(path, S)
    assert out.shape == (S, S, 1)
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


DICOM_VARIANTS = [(pi, bits, win) for pi in ("MONOCHROME2", "MONOCHROME1") for bits in (8, 16)
                  for win in (False, True)]


@needs_pydicom
@pytest.mark.parametrize("pi,bits,with_window", DICOM_VARIANTS,
                         ids=[f"{p[-1]}-{b}bit-{'window' if w else 'nowindow'}" for p, b, w in DICOM_VARIANTS])
def test_dicom_matches_png(tmp_path, gray, expected, pi, bits, with_window):
    """MONOCHROME2 / MONOCHROME1 (inverted stored values), 8-bit and 16-bit (v * 257), with an
    identity window (centre and width covering the stored range) and without: all exact."""
    top = (1 << bits) - 1
    stored = gray.astype(np.int64) * (top // 255)
    if pi == "MONOCHROME1":
        stored = top - stored
    window = ((top + 1) // 2, top + 1) if with_window else None
    path = write_dicom(tmp_path / "x.dcm", stored, photometric=pi, bits_stored=bits, window=window)
    assert np.array_equal(read_image(path, S), expected)
    assert np.array_equal(read_image(path, S, channels=3), np.repeat(expected, 3, axis=2))


@needs_pydicom
def test_dicom_16bit_is_prepare_16bit_rule(tmp_path):
    """Any 16-bit values, not only v * 257: DICOM without a window == prepare's 16-bit PNG."""
    v = np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16)
    png = _png(tmp_path / "v.png", v)
    dcm = write_dicom(tmp_path / "v.dcm", v, bits_stored=16, sop="sc")
    assert np.array_equal(read_image(dcm, S), load_image(png, S, 1, None).pixels)


@needs_pydicom
def test_dicom_signed_and_rescaled(tmp_path, gray, expected):
    """The no-window range is the stored range through the Modality LUT: signed and rescaled
    copies of the 8-bit image come back exactly."""
    signed = gray.astype(np.int64) * 257 - 32768
    p = write_dicom(tmp_path / "s.dcm", signed, bits_stored=16, signed=True)
    assert np.array_equal(read_image(p, S), expected)
    p = write_dicom(tmp_path / "r.dcm", gray, rescale=(2, -1024))
    assert np.array_equal(read_image(p, S), expected)


def _round_half_up(x):
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).clip(0, 255).astype(np.uint8)


@needs_pydicom
def test_dicom_window_linear(tmp_path, gray):
    """A narrow window: the standard's LINEAR function with an 8-bit output range; the first
    value of a multi-valued centre/width."""
    c, w = 100, 51
    want = _round_half_up(((gray.astype(float) - (c - 0.5)) / (w - 1) + 0.5) * 255)
    assert want.min() == 0 and want.max() == 255 and 0 < (want % 255).sum()
    want = resize(want[..., None], S)
    p = write_dicom(tmp_path / "w.dcm", gray, window=(c, w))
    assert np.array_equal(read_image(p, S), want)
    p = write_dicom(tmp_path / "w2.dcm", gray, window=([c, 40], [w, 80]))
    assert np.array_equal(read_image(p, S), want)
    # 16-bit stored (v * 257) under the same window scaled, (c - 0.5) * 257 + 0.5 and
    # (w - 1) * 257 + 1: the same picture
    p = write_dicom(tmp_path / "w16.dcm", gray.astype(np.int64) * 257, bits_stored=16,
                    window=(c * 257 - 128, (w - 1) * 257 + 1))
    assert np.array_equal(read_image(p, S), want)


@needs_pydicom
def test_dicom_voi_lut_sequence(tmp_path, gray, expected):
    """A VOI LUT Sequence wins over a window; its output range is 0 .. 2^bits - 1."""
    gamma = np.round(255 * (np.arange(256) / 255) ** 0.5).astype(np.int64)
    p = write_dicom(tmp_path / "lut8.dcm", gray, voi_lut=(gamma, 8), window=(10, 5))
    assert np.array_equal(read_image(p, S), resize(gamma[gray].astype(np.uint8)[..., None], S))
    p = write_dicom(tmp_path / "lut16.dcm", gray, voi_lut=(np.arange(256) * 257, 16))
    assert np.array_equal(read_image(p, S), expected)


@needs_pydicom
def test_dicom_rgb_like_prepare(tmp_path, gray, expected):
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    want = load_image(_png(tmp_path / "c.png", colour), S, 1, None).pixels
    p = write_dicom(tmp_path / "c.dcm", colour, photometric="RGB", sop="sc")
    assert np.array_equal(read_image(p, S), want)
    p = write_dicom(tmp_path / "g.dcm", np.dstack([gray] * 3), photometric="RGB", sop="sc")
    assert np.array_equal(read_image(p, S), expected)  # R = G = B: the R channel, as prepare


@needs_pydicom
def test_dicom_found_by_content_or_extension(tmp_path, gray, expected):
    """DICM preamble whatever the name (none, or even .png); a .dcm without preamble and meta
    header is still read."""
    for name in ("IM0001", "1.2.840.113619.2.55", "looks_like.png"):
        p = write_dicom(tmp_path / name, gray)
        assert np.array_equal(read_image(p, S), expected), name
    bare = write_dicom(tmp_path / "bare.dcm", gray, file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(read_image(bare, S), expected)


@needs_pydicom
@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_dicom_compressed_decodable(tmp_path, gray, expected, syntax):
    """Compressed syntaxes that decode here: RLE (pydicom's own codec, 16-bit) and lossless
    JPEG 2000 (pydicom's Pillow plugin, when Pillow has OpenJPEG): still exact."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    ts = getattr(pydicom.uid, syntax)
    if not get_decoder(ts).is_available:
        pytest.skip(f"no {ts.name} decoder installed")
    if syntax == "RLELossless":
        p = write_dicom(tmp_path / "plain.dcm", gray.astype(np.uint16) * 257, bits_stored=16)
        ds = pydicom.dcmread(p)
        ds.compress(ts)
        ds.save_as(p)
    else:
        buf = io.BytesIO()
        try:
            Image.fromarray(gray).save(buf, format="JPEG2000", no_jp2=True, irreversible=False)
        except (OSError, KeyError) as e:
            pytest.skip(f"Pillow cannot write JPEG 2000 here: {e}")
        p = write_dicom(tmp_path / "j2k.dcm", gray, transfer_syntax=ts, pixel_data=encapsulate([buf.getvalue()]))
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == ts
    assert np.array_equal(read_image(p, S), expected)


# ---------------------------------------------------------------- errors
def test_truncated_png_and_missing_file(tmp_path, gray):
    p = _png(tmp_path / "cut.png", gray)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFileError, match="cut.png") as e:
        read_image(p, S)
    assert isinstance(e.value, DataError) and e.value.path == str(p)
    with pytest.raises(ImageFileError, match="nope.png: no such file"):
        read_image(tmp_path / "nope.png", S)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageFileError, match="text.png: cannot decode image"):
        read_image(tmp_path / "text.png", S)


@needs_pydicom
def test_corrupt_dicom(tmp_path, gray):
    p = write_dicom(tmp_path / "cut.dcm", gray.astype(np.uint16) * 257, bits_stored=16)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - H * W])          # half the pixel data gone
    with pytest.raises(ImageFileError, match="cut.dcm") as e:
        read_image(p, S)
    assert isinstance(e.value, DataError) and e.value.path == str(p)
    junk = tmp_path / "junk.dcm"                       # a preamble, then garbage
    junk.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    with pytest.raises(ImageFileError, match="junk.dcm: DICOM file without pixel data"):
        read_image(junk, S)
    fake = tmp_path / "fake.dcm"                       # not DICOM at all
    fake.write_text("hello")
    with pytest.raises(ImageFileError, match="fake.dcm: not a DICOM file"):
        read_image(fake, S)


@needs_pydicom
def test_dicom_refusals(tmp_path, gray):
    frames = np.concatenate([gray, gray])
    p = write_dicom(tmp_path / "multi.dcm", gray, frames=2, pixel_data=frames.tobytes())
    with pytest.raises(ImageFileError, match=r"multi.dcm: DICOM file has 2 frames; a chest film is one frame"):
        read_image(p, S)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()                                     # a valid DICOM file without pixels
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"   # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(ImageFileError, match=r"sr.dcm: DICOM file without pixel data .*; SOP class Basic Text"):
        read_image(tmp_path / "sr.dcm", S)


@needs_pydicom
def test_undecodable_transfer_syntax(tmp_path, gray):
    """JPEG-LS needs a plugin (pylibjpeg-libjpeg, pyjpegls or gdcm) this environment lacks: the
    error names the syntax and the packages."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    p = write_dicom(tmp_path / "ls.dcm", gray, transfer_syntax=JPEGLSLossless,
                    pixel_data=encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)]))
    with pytest.raises(ImageFileError) as e:
        read_image(p, S)
    msg = str(e.value)
    assert msg.startswith(f"{p}: pixel data in transfer syntax JPEG-LS Lossless Image Compression"), msg
    assert "pylibjpeg-libjpeg" in msg and "gdcm" in msg, msg


def test_dicom_without_pydicom(tmp_path, monkeypatch):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + bytes(32))
    monkeypatch.setitem(sys.modules, "pydicom", None)   # import pydicom -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pydicom is not installed.*medattn\[dicom\]"):
        read_image(p, S)


# ---------------------------------------------------------------- which files
@pytest.fixture
def tree(tmp_path, gray):
    root = tmp_path / "films"
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".cache").mkdir()
    _png(root / "one.png", gray)
    _png(root / "a" / "TWO.PNG", gray)
    Image.fromarray(gray).save(root / "a" / "three.jpeg")
    Image.fromarray(gray).save(root / "a" / "deep" / "four.jpg")
    (root / "a" / "deep" / "five.dcm").write_bytes(b"")        # by extension (not read here)
    dicm = b"\0" * 128 + b"DICM" + bytes(16)
    (root / "a" / "IM0006").write_bytes(dicm)                  # extension-less DICOM
    (root / "a" / "1.2.840.7").write_bytes(dicm)               # UID-named DICOM
    (root / "README").write_text("x" * 200)                    # extension-less, not DICOM
    (root / "notes.txt").write_text("one.png\n")
    (root / "labels.csv").write_text("path\none.png\n")
    _png(root / ".cache" / "hidden.png", gray)
    _png(root / ".hidden.png", gray)
    return root


EXPECTED_TREE = ["a/1.2.840.7", "a/IM0006", "a/TWO.PNG", "a/deep/five.dcm", "a/deep/four.jpg",
                 "a/three.jpeg", "one.png"]


def _rel(found, root):
    paths = found.files if hasattr(found, "files") else found
    if hasattr(found, "problems"):
        assert found.problems == [], found.problems
    assert all(p.is_absolute() for p in paths)
    return [p.relative_to(root).as_posix() for p in paths]


def test_expand_folder(tree):
    assert _rel(expand_inputs([tree]), tree) == EXPECTED_TREE
    assert _rel(expand_inputs(str(tree)), tree) == EXPECTED_TREE               # one item
    # folder + one of its files + a subfolder: each file once, sorted
    got = expand_inputs([tree / "a", tree, tree / "one.png"])
    assert _rel(got, tree) == EXPECTED_TREE
    assert _rel(expand_inputs([tree / "README"]), tree) == ["README"]          # a named file is taken


def test_expand_txt_list(tree, tmp_path, monkeypatch):
    lst = tree / "a" / "list.txt"
    lst.write_text(f"# films\nthree.jpeg\n\n  deep/four.jpg  \n{tree / 'one.png'}\nthree.jpeg\n")
    monkeypatch.chdir(tmp_path)
    assert _rel(expand_inputs(["films/a/list.txt"]), tree) == ["a/deep/four.jpg", "a/three.jpeg", "one.png"]
    lst.write_text("three.jpeg\nmissing.png\ndeep\n")   # missing rows are named, the rest is read
    got = expand_inputs([lst])
    assert _rel(got.files, tree) == ["a/three.jpeg"]
    assert got.problems == [(tree / "a" / "deep", f"not a file (listed in {lst}, row 3, as 'deep')"),
                            (tree / "a" / "missing.png", f"no such file (listed in {lst}, row 2, as 'missing.png')")]
    lst.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="list.txt: the list names no files"):
        expand_inputs([lst])


@pytest.mark.parametrize("text,want", [
    ("id,path,label\nx,one.png,1\ny,a/TWO.PNG,0\nz,one.png,1\n", ["a/TWO.PNG", "one.png"]),
    ("Image,Label\na/three.jpeg,1\n", ["a/three.jpeg"]),
    ("Image Index,Finding Labels\none.png,x\n", ["one.png"]),                 # first column, header
    ("one.png,1\na/TWO.PNG,0\n", ["a/TWO.PNG", "one.png"]),                   # first column, no header
    ("a/IM0006\na/1.2.840.7\n", ["a/1.2.840.7", "a/IM0006"]),                 # no header, existing files
], ids=["path", "image", "first-header", "first-noheader", "noext-noheader"])
def test_expand_csv_list(tree, text, want):
    lst = tree / "list.csv"
    lst.write_text(text)
    assert _rel(expand_inputs([lst]), tree) == want


def test_expand_errors(tree):
    with pytest.raises(DataError, match=r"nowhere: no such file or folder"):
        expand_inputs([tree / "one.png", tree / "nowhere"])
    lst = tree / "bad.csv"
    lst.write_text("path,x\none.png,1\n\nlost.png,2\n,3\n")
    got = expand_inputs([lst])
    assert _rel(got.files, tree) == ["one.png"]
    assert got.problems == [(lst, "row 5, column 'path': empty path cell"),
                            (tree / "lost.png", f"no such file (listed in {lst}, row 4, as 'lost.png')")]
    lst.write_text("path\n")
    with pytest.raises(DataError, match=r"bad.csv: the list names no files \(only a header\)"):
        expand_inputs([lst])
    empty = tree / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"empty: no image files in this folder"):
        expand_inputs([empty])


# ---------------------------------------------------------------- quality warnings (issue 23)
def pydicom_file(name: str, dest):
    """A copy, in ``dest`` (a folder), of one of the DICOM files pydicom ships as test data."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    src = get_testdata_file(name, download=False)
    if src is None:
        pytest.skip(f"pydicom's test file {name} is not installed with this pydicom")
    return Path(shutil.copy(src, Path(dest) / name))


def _read_warned(path, size=S, channels=1):
    """read_image's pixels and every warning it raised (all of them, not only ImageWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        px = read_image(path, size, channels)
    return px, [(w.category, str(w.message)) for w in caught]


@needs_pydicom
def test_flat_dicoms_warn_once_each(tmp_path):
    """pydicom's own files without a window: each read (as its stored range says) and one warning
    naming the file, its grey levels and why; a file with a window reads without one."""
    ct = pydicom_file("CT_small.dcm", tmp_path)                    # 128 x 128, BitsStored 16, signed
    px, said = _read_warned(ct)
    assert (px.min(), px.max()) == (128, 136)
    assert said == [(ImageWarning, f"{ct}: almost no contrast: 9 grey levels after reading (128..136); the DICOM "
                                   "file has no window (Window Center/Width or VOI LUT), so its whole stored range "
                                   "-33792..31743 was mapped to 0..255")]
    dose = pydicom_file("rtdose_1frame.dcm", tmp_path)             # 10 x 10 dose grid, 32-bit, all 0 here
    px, said = _read_warned(dose)
    assert (px == 0).all() and len(said) == 1 and said[0][0] is ImageWarning
    assert said[0][1].startswith(f"{dose}: almost no contrast: 1 grey level after reading (all 0); the DICOM file "
                                 "has no window")
    assert said[0][1].endswith("; 10x10 px, smaller than 64 px")
    px, said = _read_warned(pydicom_file("MR_small.dcm", tmp_path))  # 64 x 64 with a window
    assert said == [] and px.max() - px.min() > 100


@needs_pydicom
def test_flat_stretched_jpeg2000_dicom(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000

    if not get_decoder(JPEG2000).is_available:
        pytest.skip("no JPEG 2000 decoder for pydicom here")
    j2k = pydicom_file("JPEG2000.dcm", tmp_path)                   # 1024 rows x 256 columns
    px, said = _read_warned(j2k)
    assert (px.min(), px.max()) == (127, 128)
    assert len(said) == 1 and said[0][0] is ImageWarning
    notes = said[0][1].removeprefix(f"{j2k}: ").split("; ")
    assert notes[0] == "almost no contrast: 2 grey levels after reading (127..128)"
    assert notes[-2:] == ["256x1024 px, an aspect ratio beyond 1:2 (stretched or cropped?)",
                          "it is resized to a square like every input"]


def test_tiny_png_warns(tmp_path):
    p = _png(tmp_path / "dot.png", np.full((1, 1), 200, np.uint8))
    px, said = _read_warned(p)
    assert px.shape == (S, S, 1) and (px == 200).all()
    assert said == [(ImageWarning, f"{p}: almost no contrast: 1 grey level after reading (all 200); "
                                   "1x1 px, smaller than 64 px")]


def test_real_films_and_a_stretched_one(shared_nih, tmp_path):
    """Real films read without a word; one stretched to 1024 x 400 is named for its aspect ratio."""
    films = sorted((shared_nih / "images").glob("*.png"))[:3]
    for f in films:
        _, said = _read_warned(f)
        assert said == [], f
    stretched = tmp_path / "stretched.png"
    Image.open(films[0]).resize((1024, 400), Image.Resampling.LANCZOS).save(stretched)
    _, said = _read_warned(stretched)
    assert said == [(ImageWarning, f"{stretched}: 1024x400 px, an aspect ratio beyond 1:2 (stretched or cropped?); "
                                   "it is resized to a square like every input")]


@needs_pydicom
def test_pydicom_warnings_folded_into_one_line(tmp_path):
    """SC_rgb_jpeg.dcm makes pydicom warn (its meta says explicit VR, its data set is implicit):
    the warning is part of medattn's one ImageWarning for the file, and nothing else is raised."""
    p = pydicom_file("SC_rgb_jpeg.dcm", tmp_path)
    _, said = _read_warned(p)
    assert len(said) == 1 and said[0][0] is ImageWarning, said
    assert said[0][1].startswith(f"{p}: ") and "\n" not in said[0][1]
    assert "pydicom: Expected explicit VR, but found implicit VR - using implicit VR for reading" in said[0][1]


@needs_pydicom
def test_12bit_jpeg_extended_names_its_decoders(tmp_path):
    """Pillow (pydicom's only installed JPEG plugin here) reads no 12-bit JPEG Extended: the error
    says so and names the packages of the plugins that do."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    if set(get_decoder(JPEGExtended12Bit).available_plugins) - {"pillow"}:
        pytest.skip("a 12-bit JPEG decoder is installed here")
    p = pydicom_file("JPEG-lossy.dcm", tmp_path)
    with pytest.raises(ImageFileError) as e:
        read_image(p, S)
    msg = str(e.value)
    assert msg.startswith(f"{p}: cannot decode the DICOM pixel data (transfer syntax JPEG Extended (Process 2 and 4))")
    assert "12-bit precision" in msg
    assert "pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1 (pydicom's 'pylibjpeg' plugin)" in msg
    assert "python-gdcm>=3.0.10 (pydicom's 'gdcm' plugin)" in msg


@needs_pydicom
def test_every_compressed_syntax_names_a_decoder(tmp_path, gray):
    """For each compressed transfer syntax pydicom knows, pixel data that cannot be decoded here
    (no plugin, a plugin that fails, or no decoder in pydicom at all) gets an error that names what
    would decode it: a package from pydicom's plugin table, or the tool for syntaxes pydicom has
    no decoder for."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import AllTransferSyntaxes, UID

    names = ("pylibjpeg", "python-gdcm", "pyjpegls", "gdcmconv", "ffmpeg", "JPIP server", "video/audio")
    seen = 0
    for uid in map(UID, AllTransferSyntaxes):
        if not uid.is_compressed:
            continue
        p = write_dicom(tmp_path / f"{uid}.dcm", gray, transfer_syntax=uid,
                        pixel_data=encapsulate([b"\xff\xd8\xff\xe0" + bytes(64)]))
        with pytest.raises(ImageFileError) as e:
            read_image(p, S)
        msg = str(e.value)
        assert uid.name in msg and any(n in msg for n in names), msg
        seen += 1
    assert seen >= 30


# ---------------------------------------------------------------- real folders (issue 23)
def test_expand_links_and_loops(tmp_path, gray):
    """Dangling links are named, not fatal; linked folders are followed once; a link to a parent
    ends; a dangling link named on the command line is a problem too, a typo an error."""
    root, other = tmp_path / "in", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    _png(root / "a.png", gray)
    _png(root / "sub" / "b.png", gray)
    _png(other / "c.png", gray)
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")     # dangling, image name
    (root / "IM0007").symlink_to(tmp_path / "deleted")            # dangling, no extension: maybe DICOM
    (root / "old.txt").symlink_to(tmp_path / "deleted.txt")       # dangling, not an image: not named
    (root / "linked").symlink_to(other, target_is_directory=True)
    (root / "linked-again").symlink_to(other, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "film.png").symlink_to(root / "sub" / "b.png")        # a link to a file: taken
    got = expand_inputs([root])
    assert [p.relative_to(root).as_posix() for p in got.files] == ["a.png", "film.png", "linked/c.png", "sub/b.png"]
    assert got.problems == [(root / "IM0007", f"dangling symbolic link (to {tmp_path / 'deleted'})"),
                            (root / "gone.png", f"dangling symbolic link (to {tmp_path / 'deleted.png'})")]
    got = expand_inputs([root / "gone.png", root / "a.png"])
    assert got.files == [root / "a.png"] and [p for p, _ in got.problems] == [root / "gone.png"]
    with pytest.raises(DataError, match=r"typo.png: no such file or folder"):
        expand_inputs([root / "a.png", root / "typo.png"])
    with pytest.raises(ImageFileError, match=r"gone.png: dangling symbolic link \(to .*deleted.png\)"):
        read_image(root / "gone.png", S)
