"""Image decoding and validation.

Every entry point (detector, datasets, CLI, app) reads images through `load_image`, and masks
through `load_mask`, so a file, a PIL image, a numpy array and a tensor holding the same pixels
give the same result, and a bad input gets the same clear message everywhere. Images come out
as 8-bit RGB PIL images, decoded by one rule per pixel type (`pixels_to_rgb8`), never by the
image's own range of values:

- 8-bit (uint8; PIL modes L, P, RGB, RGBA, LA, CMYK, ...): as stored;
- 16-bit (uint16; 16-bit PNG and TIFF, PIL mode I;16): the high byte, v // 256, so 0..65535
  spans 0..255 (an 8-bit image widened with v * 257 comes back exactly, and this is how PIL
  itself reads 16-bit colour PNG and TIFF);
- float (float16/32/64; float TIFF, PIL mode F): values in [0, 1], scaled by 255 and rounded;
  NaN, infinite and out-of-range values are refused;
- bool (PIL mode 1): False -> 0, True -> 255;
- other integer types (int64 arrays, 32-bit integer TIFF): 8-bit levels 0..255; other values
  are refused (store 16-bit data as uint16).

Grey images are replicated to three channels; a second or fourth channel is alpha, composited
on black (texture photos have no meaningful alpha). Arrays are H x W, H x W x C or C x H x W
(C in 1..4); tensors are C x H x W (the same dtype rules: a uint8 tensor is 8-bit, a float
tensor is in [0, 1]). Only batches given to `to_batch` as B x 3 x H x W float tensors use the
package's internal range [-1, 1].

Also: EXIF orientation is applied (an unreadable EXIF block leaves the image as stored);
images above `MAX_PIXELS` are refused before they are decoded (decompression bombs), and images
with a side under `MIN_SIDE` as too small to inspect; only raster formats in `FORMATS` are
opened: PIL's other plugins (EPS, which runs Ghostscript, and a long tail of rare formats) are
never handed an untrusted file.

Masks (`load_mask`): a pixel is a defect when its stored value is non-zero in any colour
channel, whatever the encoding (0/255, 0/1, grey level 100 as in MVTec LOCO, palette, RGB,
16-bit, float); a fully transparent pixel is background.

Resizing policy (documented in the README): the detector resizes every image to its square
working size (`image_size`, e.g. 256 x 256) as anomalib does for MVTec AD, and maps are
reported at that size; `resize_map` brings a map back to the original size for display.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # 40 MP: bigger than any camera frame we expect, well below a bomb
MIN_SIDE = 8
MAX_ASPECT = 16.0
# Formats PIL may open (its plugin names); anything else is "not an image file".
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM")  # JPEG includes MPO (phone photos)

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor]


class ImageError(ValueError):
    """An input that is not a usable image; the message names the problem."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{source}'"
    return f"the {type(source).__name__} input"


def _check_size(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} is empty ({width}x{height} pixels).")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{what} is {width}x{height} pixels ({width * height / 1e6:.0f} MP), above the "
            f"{MAX_PIXELS / 1e6:.0f} MP limit. Downscale it first; the detector works at a few "
            "hundred pixels anyway."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{what} is {width}x{height} pixels: too small to inspect (each side needs at "
            f"least {MIN_SIDE} pixels)."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(
            f"{what} is {width}x{height} pixels: aspect ratio above {MAX_ASPECT:.0f}:1. "
            "Crop it into squarer tiles first; it would be distorted beyond use when resized "
            "to the detector's square working size."
        )


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"RIFF", "WEBP"))


def _sniff(source: Any) -> str | None:
    """The accepted format a file's first bytes announce, if any."""
    try:
        if isinstance(source, (bytes, bytearray)):
            head = bytes(source[:16])
        else:
            with open(source, "rb") as f:
                head = f.read(16)
    except OSError:
        return None
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. A corrupt EXIF block (PIL raises SyntaxError, ValueError,
    struct.error, ... while parsing it) leaves the image as stored, as browsers do."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - any EXIF parsing failure
        return img


def _as_hwc(arr: np.ndarray) -> np.ndarray:
    """H x W, H x W x C or C x H x W (C in 1..4) -> H x W x C."""
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(
            "an image array must be H x W, H x W x C or C x H x W with C = 1 (grey), 2 (grey + alpha), "
            f"3 (RGB) or 4 (RGBA); got shape {tuple(arr.shape)}."
        )
    if arr.size == 0:
        raise ImageError(f"the image is empty (shape {tuple(arr.shape)}).")
    return arr


def _levels(arr: np.ndarray, what: str) -> np.ndarray:
    """The decoding rule of `arr`'s dtype: 8-bit levels (uint8), same shape."""
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 1:
        return arr.astype(np.uint8, copy=False)
    if kind == "u" and size == 2:
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"{what} contains NaN or infinite pixel values.")
        a = arr.astype(np.float64)
        if a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise ImageError(
                f"{what} is a float image with values in [{a.min():.4g}, {a.max():.4g}]; float images "
                "must hold values in [0, 1] (divide 8-bit data by 255, or store it as uint8)."
            )
        return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(
                f"{what} is an integer image ({arr.dtype.name}) with values in [{lo}, {hi}]; integer images other than "
                "uint16 must hold 8-bit levels 0..255 (store 16-bit data as uint16, or scale it to uint8)."
            )
        return arr.astype(np.uint8)
    raise ImageError(f"{what} has pixel type {arr.dtype}, which is not an image type "
                     "(use uint8, uint16, float in [0, 1] or bool).")


def pixels_to_rgb8(arr: np.ndarray, what: str = "the image") -> np.ndarray:
    """The one decoding rule (see the module docstring): pixels of any supported dtype and
    layout (H x W, H x W x C or C x H x W, C = 1..4) -> uint8 H x W x 3.

    Depends only on the dtype, never on the range of values in the image. Raises ImageError
    for an unsupported shape or dtype, NaN, and values outside the dtype's range."""
    levels = _levels(_as_hwc(np.asarray(arr)), what)
    channels = levels.shape[-1]
    colour = levels[..., :-1] if channels in (2, 4) else levels
    if channels in (2, 4):  # composite on black
        alpha = levels[..., -1:].astype(np.uint32)
        colour = ((colour.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    return np.ascontiguousarray(colour)


def _pil_pixels(img: Image.Image) -> np.ndarray:
    """The stored pixels of a PIL image, in their own dtype (8-bit colour modes as RGB / RGBA)."""
    mode = img.mode
    if mode == "I" and img.format == "PNG":  # Pillow < 11 opens 16-bit grey PNGs as mode I
        return np.asarray(img).astype(np.uint16)
    if mode in ("1", "L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode in ("PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...: 8-bit colour


def _tensor_pixels(t: torch.Tensor) -> np.ndarray:
    """A C x H x W (or H x W) tensor's pixels as a numpy array of the same dtype kind."""
    t = t.detach().cpu()
    if t.ndim == 4:
        raise ImageError(
            f"a 4-D tensor {tuple(t.shape)} is a batch (B x 3 x H x W in [-1, 1]); pass it to "
            "Detector.detect / to_batch, or give one image as C x H x W."
        )
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    try:
        return t.numpy()
    except TypeError:
        raise ImageError(f"a tensor of dtype {t.dtype} is not an image (use uint8, uint16, float or bool).") from None


def _open(source: ImageLike, what: str) -> Any:
    """A decoded PIL image (upright) for paths, bytes and PIL images; arrays and tensors as
    numpy arrays. Sizes are checked; a bad file gets an ImageError naming it."""
    if isinstance(source, torch.Tensor):
        return _tensor_pixels(source)
    if isinstance(source, np.ndarray):
        return source
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, what)
        return _upright(source)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError("the uploaded file is empty (0 bytes).")
        stream: Any = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{what} does not exist.")
        if path.is_dir():
            raise ImageError(f"{what} is a folder, not an image file.")
        if path.stat().st_size == 0:
            raise ImageError(f"{what} is an empty file (0 bytes).")
        stream = path
    else:
        raise ImageError(f"cannot read an image from {what}.")

    try:
        with warnings.catch_warnings():
            # PIL warns from 89 MP on; _check_size refuses from MAX_PIXELS (40 MP) on with the
            # usual message, before anything is decoded. PIL refuses above 179 MP when it opens
            # the file; that is reported with the same limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # `with`: the file is closed once decoded, multi-frame images included.
            with Image.open(stream, formats=FORMATS) as img:
                _check_size(img.width, img.height, what)
                img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            announced = _sniff(source)
            if announced:
                raise ImageError(
                    f"{what} is not an image file cgdiff can decode: it starts like a {announced} file "
                    "but looks truncated or corrupt, or stores a pixel type PIL cannot read (such as "
                    "float colour or 64-bit TIFF)."
                ) from None
            raise ImageError(
                f"{what} is not an image file in a format cgdiff reads ({', '.join(FORMATS)})."
            ) from None
        declared = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(declared.group(1)) / 1e6:.0f} MP" if declared else "a huge size"
        raise ImageError(
            f"{what} declares {size}, above the {MAX_PIXELS / 1e6:.0f} MP limit (a decompression bomb?); "
            "it was not decoded."
        ) from None
    except Exception as e:  # noqa: BLE001 - decoders of malformed files raise OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError, ...: all mean the same to the user.
        raise ImageError(f"{what} could not be decoded, the file looks truncated or corrupt ({e}).") from None
    return _upright(img)


def _pixels(source: ImageLike, what: str) -> np.ndarray:
    opened = _open(source, what)
    return _pil_pixels(opened) if isinstance(opened, Image.Image) else opened


def load_image(source: ImageLike) -> Image.Image:
    """Decode `source` to an 8-bit RGB PIL image by the rule of its pixel type.

    source: a path, the bytes of a file, a PIL image, a numpy array (H x W, H x W x C or
    C x H x W, C = 1..4) or a C x H x W tensor; dtypes and their meaning as in the module
    docstring (uint8, uint16, float in [0, 1], bool). Raises ImageError naming the input for
    anything that is not a usable image."""
    what = _describe(source)
    rgb = pixels_to_rgb8(_pixels(source, what), what)
    _check_size(rgb.shape[1], rgb.shape[0], what)
    return Image.fromarray(rgb, "RGB")


def load_mask(source: ImageLike) -> np.ndarray:
    """Decode a ground-truth mask: bool H x W, True where a pixel is a defect.

    A pixel is a defect when its stored value is non-zero in any colour channel, whatever the
    encoding: 0/255 or 0/1 grey, grey level 100 (MVTec LOCO), mode 1, palette (by colour),
    RGB, 16-bit, float. A pixel with alpha 0 is background. Sources as for `load_image`;
    raises ImageError for an unreadable mask or NaN values."""
    what = _describe(source)
    arr = _as_hwc(np.asarray(_pixels(source, what)))
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ImageError(f"{what} contains NaN or infinite values: not a mask.")
    if arr.dtype.kind not in "biuf":
        raise ImageError(f"{what} has pixel type {arr.dtype}, which is not a mask type.")
    _check_size(arr.shape[1], arr.shape[0], what)
    channels = arr.shape[-1]
    colour = arr[..., :-1] if channels in (2, 4) else arr
    defect = (colour != 0).any(axis=-1)
    if channels in (2, 4):
        defect &= arr[..., -1] != 0
    return defect


def to_tensor(image: ImageLike, size: int | None = None) -> torch.Tensor:
    """RGB image -> float tensor 3 x H x W in [-1, 1], resized to size x size if given."""
    img = load_image(image)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_batch(images, size: int) -> torch.Tensor:
    """A list of image-likes (or a B x 3 x H x W tensor in [-1, 1]) -> B x 3 x size x size, in
    [-1, 1]. Raises ImageError naming every image of the list that cannot be used."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if not torch.isfinite(images).all():
            raise ImageError("the input batch contains NaN or infinite values.")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ImageError(f"a batch tensor must be B x 3 x H x W; got {tuple(images.shape)}.")
        if images.min() < -1.001 or images.max() > 1.001:
            raise ImageError(
                "a batch tensor must hold values in [-1, 1]; got range "
                f"[{images.min().item():.3g}, {images.max().item():.3g}]."
            )
        images = images.float()
        if images.shape[-2:] != (size, size):
            images = torch.nn.functional.interpolate(
                images, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(-1, 1)
        return images
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)) or (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3
    ):
        images = [images]
    images = list(images)
    if not images:
        raise ImageError("no images were given.")
    tensors, problems = [], []
    for i, im in enumerate(images):  # every unusable image is named at once, not only the first
        try:
            tensors.append(to_tensor(im, size))
        except ImageError as e:
            where = "" if isinstance(im, (str, os.PathLike)) else f"list item {i} (counting from 0): "
            problems.append(where + str(e))
    if len(problems) == 1 and len(images) == 1:
        raise ImageError(problems[0])
    if problems:
        raise ImageError(f"{len(problems)} of {len(images)} images cannot be used:\n  " + "\n  ".join(problems))
    return torch.stack(tensors)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Tensor in [-1, 1] (3 x H x W or B x 3 x H x W) -> uint8 H x W x 3 (or B x H x W x 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float H x W map to (width, height) with bilinear interpolation."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()
