"""Hostile image input: every file, array or PIL image either becomes an 8-bit RGB image the
detector can use or raises an ImageError that says what is wrong. Never another exception,
never a NaN in the tensors, never a decompression bomb decoded, never Ghostscript run.

The fuzz tests mutate real PNG / JPEG / GIF / TIFF / BMP / WebP / PPM files (bytes flipped,
replaced, cut out, inserted, truncated) and generate arrays and PIL images of every dtype and
mode; the number of cases is bounded and derandomised, so CI sees the same cases every run."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from cgdiff import images
from cgdiff.images import FORMATS, ImageError, load_image, to_batch, to_tensor

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _texture(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG header that declares width x height pixels, with almost no data:
    what a decompression bomb looks like before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is edited to declare width x height."""
    data = bytearray(_encode(Image.fromarray(_texture()), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encode(Image.fromarray(_texture()).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def jpeg_with_exif(orientation: int) -> bytes:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", exif=exif, quality=95)


def jpeg_with_corrupt_exif() -> bytes:
    data = bytearray(jpeg_with_exif(6))
    start = data.index(b"Exif\x00\x00") + 6
    data[start : start + 4] = b"MM\x00\xc5"  # the TIFF header of the EXIF block is now invalid
    return bytes(data)


def float_tiff(value: float) -> bytes:
    arr = np.full((24, 24), 0.5, np.float32)
    arr[3, 4] = value
    return _encode(Image.fromarray(arr, "F"), "TIFF")


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
       b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def _valid_png() -> bytes:
    return _encode(Image.fromarray(_texture()), "PNG")


def _valid_jpeg() -> bytes:
    return _encode(Image.fromarray(_texture()), "JPEG", quality=90)


BAD = {
    "text file": (b"name,score\nsample,0.3\n", "not an image file"),
    "html page": (b"<!doctype html><html><body><img src=x></body></html>", "not an image file"),
    "zip archive": (b"PK\x03\x04" + b"\x00" * 60, "not an image file"),
    "pdf": (b"%PDF-1.7\n1 0 obj << >> endobj\n%%EOF", "not an image file"),
    "eps (would run Ghostscript)": (EPS, "not an image file"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "not an image file"),
    "empty": (b"", "empty"),
    "png header only": (_valid_png()[:33], "truncated or corrupt"),
    "truncated png": (_valid_png()[: len(_valid_png()) // 2], "truncated or corrupt"),
    "png with a broken checksum": (_valid_png()[:40] + b"\x00\x00" + _valid_png()[42:], "truncated or corrupt"),
    "truncated jpeg": (_valid_jpeg()[: len(_valid_jpeg()) // 3], "truncated or corrupt"),
    "jpeg header only": (_valid_jpeg()[:200], "truncated or corrupt"),
    "png bomb (100000 x 100000)": (png_declaring(100_000, 100_000), "MP limit"),
    "png bomb (2^31 - 1 wide)": (png_declaring(2**31 - 1, 64), "MP limit"),
    "jpeg bomb (65000 x 65000)": (jpeg_declaring(65_000, 65_000), "MP limit"),
    "gif bomb (65535 x 65535)": (gif_declaring(65_535, 65_535), "MP limit"),
    "png of zero width": (png_declaring(0, 64), "truncated or corrupt|empty"),
    "one pixel": (_encode(Image.new("RGB", (1, 1)), "PNG"), "too small"),
    "a thin line (2000 x 20)": (_encode(Image.new("RGB", (2000, 20)), "PNG"), "aspect ratio"),
    "a tall line (12 x 600)": (_encode(Image.new("L", (12, 600)), "PNG"), "aspect ratio"),
    "float tiff with NaN": (float_tiff(float("nan")), "NaN"),
    "float tiff with inf": (float_tiff(float("inf")), "NaN or infinite"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_hostile_files_get_a_clear_message(name, tmp_path):
    data, message = BAD[name]
    with pytest.raises(ImageError, match=message):
        load_image(data)
    path = tmp_path / "upload.png"  # the same file from disk, under a misleading name
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message) as caught:
        load_image(path)
    if data:
        assert "upload.png" in str(caught.value), "a file is named in the message"


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    with pytest.raises(ImageError, match="not an image file"):
        load_image(EPS)
    assert not calls


def test_the_accepted_formats_are_ones_pil_can_open():
    Image.init()
    assert set(FORMATS) <= set(Image.OPEN), sorted(set(FORMATS) - set(Image.OPEN))
    assert "EPS" not in FORMATS


def _rgb(data) -> np.ndarray:
    out = load_image(data)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_unusual_but_valid_files_are_converted():
    tex = _texture()
    grey16 = (tex[..., 0].astype(np.uint16) * 257)
    out = _rgb(_encode(Image.fromarray(grey16), "PNG"))
    assert np.abs(out[..., 0].astype(int) - tex[..., 0]).max() <= 1  # 16 bit scaled, not clipped
    out = _rgb(_encode(Image.fromarray(grey16), "TIFF"))
    assert np.abs(out[..., 1].astype(int) - tex[..., 0]).max() <= 1

    palette = Image.fromarray(tex).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    assert _rgb(_encode(palette, "PNG")).shape == (48, 40, 3)
    assert _rgb(_encode(palette, "GIF")).shape == (48, 40, 3)

    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    red = _rgb(_encode(cmyk, "JPEG", quality=95))[16, 16]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert _rgb(_encode(cmyk, "TIFF"))[0, 0].tolist() == [255, 0, 0]

    assert _rgb(_encode(Image.fromarray(tex).convert("1"), "PNG")).shape == (48, 40, 3)
    assert _rgb(_encode(Image.fromarray(tex).convert("LA"), "PNG")).shape == (48, 40, 3)
    assert _rgb(_encode(Image.fromarray(tex), "WEBP", lossless=True)).tolist() == tex.tolist()
    assert _rgb(_encode(Image.fromarray(tex), "BMP")).tolist() == tex.tolist()
    assert _rgb(_encode(Image.fromarray(tex), "PPM")).tolist() == tex.tolist()
    levels = tex[..., 0].astype(np.int32)  # 32-bit integer TIFF holding 8-bit levels
    assert _rgb(_encode(Image.fromarray(levels, "I"), "TIFF"))[..., 2].tolist() == tex[..., 0].tolist()
    wide = (levels - 128) * 1000  # ... or values no pixel type defines: refused, not stretched
    with pytest.raises(ImageError, match=r"integer image \(int32\) with values in \[-128000, 127000\]"):
        load_image(_encode(Image.fromarray(wide, "I"), "TIFF"))
    ramp = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)  # float TIFF: [0, 1] times 255
    out = _rgb(_encode(Image.fromarray(ramp, "F"), "TIFF"))
    assert out[..., 0].tolist() == np.rint(ramp * 255).astype(np.uint8).tolist()
    with pytest.raises(ImageError, match=r"float image with values in \[-5, 7\]"):
        load_image(_encode(Image.fromarray(ramp * 12 - 5, "F"), "TIFF"))  # never stretched per image

    frames = [Image.fromarray(np.full((30, 30, 3), v, np.uint8)) for v in (10, 120, 240)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert _rgb(buffer.getvalue())[0, 0].tolist() == [10, 10, 10]  # an animation: its first frame


def test_exif_rotation_is_applied_and_a_corrupt_exif_block_is_ignored():
    upright = _rgb(jpeg_with_exif(6))
    assert upright.shape[:2] == (40, 20)  # rotated 90 degrees for display
    assert upright[2, 10].mean() > 200 and upright[-3, 10].mean() < 50  # the white half is on top
    as_stored = _rgb(jpeg_with_corrupt_exif())
    assert as_stored.shape[:2] == (20, 40)


def test_bad_inputs_reach_the_detector_as_image_errors(tiny_detector):
    for name in ("text file", "truncated jpeg", "png bomb (100000 x 100000)", "float tiff with NaN"):
        with pytest.raises(ImageError):
            tiny_detector.detect(BAD[name][0])
    result = tiny_detector.detect([jpeg_with_corrupt_exif(), jpeg_with_exif(3)])
    assert len(result) == 2 and all(np.isfinite(r.score) for r in result)


# ------------------------------------------------------------------------------- fuzzing


def _seed_files() -> list[tuple[str, bytes]]:
    tex = Image.fromarray(_texture(36, 28, seed=1))
    grey16 = Image.fromarray(np.asarray(tex.convert("L")).astype(np.uint16) * 257)
    out = [
        ("png", _encode(tex, "PNG")),
        ("png-palette", _encode(tex.convert("P"), "PNG")),
        ("png-la", _encode(tex.convert("LA"), "PNG")),
        ("png-16bit", _encode(grey16, "PNG")),
        ("jpeg-exif", jpeg_with_exif(6)),
        ("jpeg-progressive", _encode(tex, "JPEG", progressive=True)),
        ("jpeg-cmyk", _encode(tex.convert("CMYK"), "JPEG")),
        ("gif", _encode(tex.convert("P"), "GIF")),
        ("tiff", _encode(tex, "TIFF")),
        ("tiff-lzw", _encode(tex, "TIFF", compression="tiff_lzw")),
        ("tiff-float", float_tiff(0.25)),
        ("tiff-16bit", _encode(grey16, "TIFF")),
        ("bmp", _encode(tex, "BMP")),
        ("webp", _encode(tex, "WEBP")),
        ("ppm", _encode(tex, "PPM")),
    ]
    return out


SEEDS = _seed_files()


def _check_decoded_or_refused(data: bytes) -> None:
    try:
        img = load_image(data)
    except ImageError as e:
        assert str(e)
        return
    assert img.mode == "RGB"
    w, h = img.size
    assert images.MIN_SIDE <= min(w, h) and w * h <= images.MAX_PIXELS
    t = to_tensor(img, 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert torch.isfinite(t).all() and t.min() >= -1 and t.max() <= 1


edit = st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(["set", "replace4", "delete", "insert"]),
                 st.binary(min_size=1, max_size=24))


@FUZZ
@given(seed=st.sampled_from(SEEDS), edits=st.lists(edit, min_size=1, max_size=6),
       header_bias=st.booleans(), cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzzed_files_decode_or_get_an_image_error(seed, edits, header_bias, cut):
    data = bytearray(seed[1])
    for where, op, payload in edits:
        span = min(len(data), 256) if header_bias else len(data)  # headers hold the sizes and tables
        pos = int(where * max(span, 1))
        if op == "set":
            data[pos : pos + 1] = payload[:1]
        elif op == "replace4":
            data[pos : pos + 4] = payload[:4].ljust(4, b"\xff")
        elif op == "delete":
            del data[pos : pos + len(payload)]
        else:
            data[pos:pos] = payload
    if cut is not None:
        data = data[: int(cut * len(data))]
    _check_decoded_or_refused(bytes(data))


dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, bool])
shapes = st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                   st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 2, 3, 4, 5])),
                   st.tuples(st.sampled_from([1, 3, 4]), st.integers(1, 40), st.integers(1, 40)))


@FUZZ
@given(array=hnp.arrays(dtypes, shapes))
def test_fuzzed_arrays_convert_or_get_an_image_error(array):
    try:
        img = load_image(array)
    except ImageError:
        return
    assert img.mode == "RGB" and min(img.size) >= images.MIN_SIDE
    t = to_batch([array], 16)
    assert torch.isfinite(t).all() and t.shape == (1, 3, 16, 16)


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "I;16"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # PIL: saving mode I as PNG
@FUZZ
@given(mode=st.sampled_from(MODES), size=st.tuples(st.integers(1, 48), st.integers(1, 48)), seed=st.integers(0, 2**16),
       fmt=st.sampled_from([None, "PNG", "TIFF", "WEBP", "GIF", "BMP", "JPEG"]))
def test_pil_images_of_every_mode_convert_or_get_an_image_error(mode, size, seed, fmt):
    rng = np.random.default_rng(seed)
    img = Image.new(mode, size)
    raw = rng.integers(0, 256, len(img.tobytes()), dtype=np.uint8).tobytes()
    img.frombytes(raw)  # any bit pattern, NaN and inf floats included
    if fmt is not None:
        try:
            data = _encode(img, fmt)
        except (OSError, ValueError, KeyError):
            return  # PIL cannot write this mode in this format
        _check_decoded_or_refused(data)
    else:
        try:
            out = load_image(img)
        except ImageError:
            return
        assert out.mode == "RGB" and out.size == size
        assert torch.isfinite(to_tensor(out)).all()


def test_a_non_finite_batch_tensor_is_refused():
    with pytest.raises(ImageError, match="NaN or infinite"):
        to_batch(torch.full((1, 3, 16, 16), float("inf")), 16)
    with pytest.raises(ImageError, match=r"\[-1, 1\]"):
        to_batch(torch.full((1, 3, 16, 16), 5.0), 16)
