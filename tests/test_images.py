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
