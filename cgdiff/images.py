"""Image decoding and validation.

Every entry point (detector, datasets, CLI, app) reads images through `load_image`, so a bad
file gets the same clear message everywhere. Images come out as 8-bit RGB PIL images:

- grey, palette, CMYK and 16-bit images are converted (16-bit is scaled to 8-bit by its
  full range, not clipped);
- transparency is dropped by compositing on black (texture photos have no meaningful alpha);
- EXIF orientation is applied, so a phone photo is inspected the way it is displayed;
- images above `MAX_PIXELS` are refused before they are decoded (decompression bombs),
  and images with a side under `MIN_SIDE` are refused as too small to inspect;
- only raster formats in `FORMATS` are opened: PIL's other plugins (EPS, which runs
  Ghostscript, and a long tail of rare formats) are never handed an untrusted file;
- an unreadable EXIF block leaves the image as stored instead of failing.

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


def _to_rgb8(img: Image.Image, what: str = "the image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without silently clipping high bit depths."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"{what} contains NaN or infinite pixel values.")
        arr = arr.astype(np.float64)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            # 16-bit PNG/TIFF: use the full 0..65535 range unless the data clearly is 8-bit.
            arr = arr / 257.0 if arr.max() > 255 else arr
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


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


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(
            f"an array image must be H x W, H x W x 3 or H x W x 4; got shape {tuple(arr.shape)}."
        )
    if arr.size == 0:
        raise ImageError(f"the array image is empty (shape {tuple(arr.shape)}).")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
        a = arr.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ImageError("the image contains NaN or infinite pixel values.")
        if np.issubdtype(arr.dtype, np.floating):
            if a.min() < -1e-6 or a.max() > 1 + 1e-6:
                raise ImageError(
                    "a float image must have values in [0, 1]; got range "
                    f"[{a.min():.3g}, {a.max():.3g}]."
                )
            a = a * 255.0
        out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"unsupported array dtype {arr.dtype} for an image.")
    if out.ndim == 3 and out.shape[-1] == 4:
        return _to_rgb8(Image.fromarray(out, "RGBA"))
    return Image.fromarray(out).convert("RGB")


def load_image(source: ImageLike) -> Image.Image:
    """Decode `source` (path, bytes, PIL image, numpy array, or CHW tensor in [0, 1]) to RGB."""
    what = _describe(source)
    if isinstance(source, torch.Tensor):
        t = source.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        return load_image(t.float().numpy())
    if isinstance(source, np.ndarray):
        img = _array_to_pil(source)
        _check_size(img.width, img.height, what)
        return img
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, what)
        return _to_rgb8(_upright(source), what)

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
                    "but looks truncated or corrupt."
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
    return _to_rgb8(_upright(img), what)


def to_tensor(image: ImageLike, size: int | None = None) -> torch.Tensor:
    """RGB image -> float tensor 3 x H x W in [-1, 1], resized to size x size if given."""
    img = load_image(image)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_batch(images, size: int) -> torch.Tensor:
    """A list of image-likes (or a B x 3 x H x W tensor in [-1, 1]) -> B x 3 x size x size."""
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
    return torch.stack([to_tensor(im, size) for im in images])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Tensor in [-1, 1] (3 x H x W or B x 3 x H x W) -> uint8 H x W x 3 (or B x H x W x 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float H x W map to (width, height) with bilinear interpolation."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()
