"""Bad and unusual images get converted or a clear ImageError, never a deep traceback."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cgdiff import images
from cgdiff.images import ImageError, load_image, to_batch


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_modes_are_converted_to_rgb():
    grey = Image.fromarray(np.full((20, 30), 100, np.uint8), "L")
    assert np.asarray(load_image(grey))[0, 0].tolist() == [100, 100, 100]

    deep = np.full((20, 30), 40000, np.uint16)  # 16-bit grey keeps its level, scaled to 8 bits
    out = load_image(Image.fromarray(deep))
    assert out.mode == "RGB" and abs(int(np.asarray(out)[0, 0, 0]) - round(40000 / 257)) <= 1
    out16 = load_image(_png(Image.fromarray(deep)))
    assert abs(int(np.asarray(out16)[0, 0, 0]) - round(40000 / 257)) <= 1

    rgba = Image.new("RGBA", (20, 20), (200, 100, 50, 0))  # fully transparent -> composited on black
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [0, 0, 0]
    rgba_opaque = Image.new("RGBA", (20, 20), (200, 100, 50, 255))
    assert np.asarray(load_image(_png(rgba_opaque)))[0, 0].tolist() == [200, 100, 50]

    palette = Image.new("RGB", (20, 20), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert load_image(palette).mode == "RGB"
    cmyk = Image.new("CMYK", (20, 20), (0, 0, 0, 0))
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image file"),
        (_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:80], "truncated or corrupt"),
        (_png(Image.new("RGB", (1, 1))), "too small"),
        (_png(Image.new("RGB", (400, 10))), "aspect ratio"),
    ],
)
def test_bad_files_get_a_clear_message(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_huge_images_are_refused_before_decoding(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    path = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(path)
    with pytest.raises(ImageError, match="MP limit"):
        load_image(path)


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_arrays_and_tensors():
    assert load_image(np.zeros((16, 16, 3), np.float32)).size == (16, 16)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((16, 16, 3), 3.0, np.float32))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((16, 16), np.nan, np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((16, 16, 5), np.uint8))
    bad = torch.zeros(2, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match="NaN"):
        to_batch(bad, 16)
    with pytest.raises(ImageError, match="no images"):
        to_batch([], 16)


def test_large_images_are_resized_to_the_working_size():
    big = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    batch = to_batch([big, Image.fromarray(big[:300, :300])], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.min() >= -1 and batch.max() <= 1


def test_detector_reports_bad_input_by_name(tiny_detector):
    with pytest.raises(ImageError, match="not an image file"):
        tiny_detector.detect(b"GIF89a-but-not-really")
    out = tiny_detector.detect(Image.new("LA", (50, 50)))  # grey + alpha works
    assert out[0].image.shape == (32, 32, 3)


# --------------------------------------------------------------------------- one rule per pixel type

import struct  # noqa: E402
import zlib  # noqa: E402

import hypothesis.extra.numpy as hnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cgdiff.images import to_tensor  # noqa: E402


def _expected_rgb8(arr: np.ndarray) -> np.ndarray:
    """The documented rule, written out independently: H x W x C -> uint8 H x W x 3."""
    if arr.dtype == bool:
        levels = np.where(arr, 255, 0)
    elif arr.dtype == np.uint16:
        levels = arr // 256
    elif arr.dtype.kind == "f":
        levels = np.rint(arr.astype(np.float64) * 255)
    else:
        levels = arr.astype(np.int64)
    levels = levels.astype(np.float64)
    if levels.shape[-1] in (2, 4):
        levels = np.rint(levels[..., :-1] * levels[..., -1:] / 255)
    if levels.shape[-1] == 1:
        levels = np.repeat(levels, 3, axis=-1)
    return levels.astype(np.uint8)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of H x W x C uint16 (PIL cannot write 16-bit colour PNGs)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _entry_points(arr: np.ndarray) -> dict:
    """The same H x W x C pixels as every input cgdiff accepts that can hold them."""
    c = arr.shape[-1]
    chw = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    out = {"array": arr, "array CHW": chw, "tensor": torch.from_numpy(chw)}
    if c == 1:
        out["array HW"] = arr[..., 0]
    pil = None
    if arr.dtype == np.uint8:
        pil = Image.fromarray(arr[..., 0] if c == 1 else arr, {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c])
    elif c == 1 and arr.dtype in (np.uint16, np.float32, bool):
        pil = Image.fromarray(arr[..., 0])
    if pil is not None:
        out["PIL"] = pil
        out["TIFF file"] = _encode(pil, "TIFF")
        if arr.dtype != np.float32:
            out["PNG file"] = _encode(pil, "PNG")
    if arr.dtype == np.uint16:
        out["PNG file"] = _png16(arr)
    return out


pixel_arrays = st.sampled_from(
    [(np.uint8, c) for c in (1, 2, 3, 4)] + [(np.uint16, c) for c in (1, 2, 3, 4)]
    + [(np.float16, 1), (np.float32, 1), (np.float32, 3), (np.float64, 4), (bool, 1), (bool, 3), (np.int64, 3)]
).flatmap(lambda dc: hnp.arrays(
    dc[0], st.tuples(st.integers(8, 14), st.integers(8, 14), st.just(dc[1])),
    elements=(st.floats(0, 1, width=np.dtype(dc[0]).itemsize * 8) if np.dtype(dc[0]).kind == "f"
              else st.integers(0, 255) if dc[0] == np.int64 else None)))


@settings(max_examples=120, deadline=None)
@given(arr=pixel_arrays)
def test_the_same_pixels_give_the_same_tensor_through_every_entry_point(arr):
    expected = torch.from_numpy(_expected_rgb8(arr).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    for name, source in _entry_points(arr).items():
        got = to_tensor(source)
        assert torch.equal(got, expected), f"{arr.dtype} x {arr.shape[-1]} through {name}"
        assert torch.equal(to_batch([source], 8)[0], to_batch([_expected_rgb8(arr)], 8)[0]), name


def test_a_16_bit_frame_decodes_by_its_type_not_by_its_content():
    # 8-bit values stored unscaled in a 16-bit PNG: dark by the 16-bit rule, from a file as from an array
    frame = (np.arange(40 * 40).reshape(40, 40) % 200).astype(np.uint16)
    from_file = np.asarray(load_image(_encode(Image.fromarray(frame), "PNG")))
    assert np.array_equal(from_file, np.asarray(load_image(frame))) and from_file.max() == 0
    brighter = frame.copy()
    brighter[0, 0] = 256  # one pixel above 255 changes that pixel only, not how the frame is read
    changed = np.asarray(load_image(_encode(Image.fromarray(brighter), "PNG")))
    assert changed[0, 0].tolist() == [1, 1, 1] and np.array_equal(changed[1:], from_file[1:])
    # an 8-bit image widened to 16 bits (v * 257) comes back exactly
    tex = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(_png16(tex.astype(np.uint16) * 257))), tex)


def test_float_images_are_scaled_not_stretched_whatever_the_entry_point():
    ramp = np.linspace(0.2, 0.6, 32 * 32, dtype=np.float32).reshape(32, 32)
    tiff = _encode(Image.fromarray(ramp), "TIFF")
    expected = np.rint(ramp * 255).astype(np.uint8)
    for source in (tiff, Image.fromarray(ramp), ramp, torch.from_numpy(ramp)[None]):
        assert np.array_equal(np.asarray(load_image(source))[..., 0], expected)
    for source in (_encode(Image.fromarray(ramp * 255), "TIFF"), ramp * 255, torch.from_numpy(ramp * 255)[None]):
        with pytest.raises(ImageError, match=r"float image with values in \[51, 153\]"):
            load_image(source)


def test_integer_tensors_follow_their_dtype():
    tex = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    chw = torch.from_numpy(tex).permute(2, 0, 1)  # as torchvision.io.read_image returns
    assert np.array_equal(np.asarray(load_image(chw)), tex)
    assert np.array_equal(np.asarray(load_image(chw > 127)), np.where(tex > 127, 255, 0))
    with pytest.raises(ImageError, match="batch"):
        load_image(chw[None])  # a batch is B x 3 x H x W in [-1, 1], for to_batch only
    with pytest.raises(ImageError, match=r"integer image \(int64\) with values in \[0, 300\]"):
        load_image(np.arange(301)[:256].reshape(16, 16) + np.arange(16)[:, None] * 3)


def test_a_list_with_several_unusable_images_names_every_one_at_once(tmp_path):
    from cgdiff.images import ImageError, to_batch

    bad_file = tmp_path / "broken.png"
    bad_file.write_bytes(b"not an image")
    good = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ImageError) as info:
        to_batch([good, tmp_path / "missing.png", good, bad_file, np.full((16, 16, 3), 2.0)], 16)
    message = str(info.value)
    assert message.startswith("3 of 5 images cannot be used")
    assert "missing.png' does not exist" in message and "broken.png' is not an image file" in message
    assert "list item 4 (counting from 0): the ndarray input is a float image" in message
