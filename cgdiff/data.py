"""Datasets (MVTec AD, DTD-Synthetic, plain folders), synthetic defects, an offline texture set.

Layouts read by `load_dataset(root)` (root is one category / class folder):

- ``mvtec``: MVTec AD.
      CLASS/train/good/*.png                 normal training images
      CLASS/test/good/*.png                  normal test images (all-zero masks)
      CLASS/test/DEFECT/NNN.png              anomalous test images, one folder per defect type
      CLASS/ground_truth/DEFECT/NNN_mask.png their masks (a DEFECT type without a ground_truth
                                             folder has no masks: image metrics only)
- ``dtd``: DTD-Synthetic (Aota et al., WACV 2023): as MVTec with the single defect folder
  ``bad``; masks in ``CLASS/ground_truth/bad`` named ``NNN.png`` or ``NNN_mask.png``.
- ``folder``: your own images.
      ROOT/*.png                 normal images, all used for training
      ROOT/normal_test/*.png     optional: held-out normal images for testing
      ROOT/abnormal/*.png        optional: anomalous images for testing
      ROOT/masks/NAME.png        optional: the mask of abnormal/NAME.* (NAME_mask.png works too)
  Without a ``masks`` folder the abnormal images have no masks (image-level evaluation only);
  with one, every abnormal image needs its mask.

In both MVTec and DTD layouts a mask may be named ``NNN_mask.*`` or ``NNN.*``. Masks are
read through `cgdiff.images.load_mask`: a pixel is a defect when it is non-zero, whatever the
file's mode (0/255, 0/1, grey level 100 as MVTec LOCO writes, mode 1, palette, RGB, RGBA,
16-bit, float). Image files are listed by `iter_images` (png, jpg, jpeg, bmp, tif, tiff, webp,
gif, ppm: the formats `cgdiff.images` reads; hidden files skipped; sorted by name).

`load_dataset` decodes every image once (``validate=True``) so that broken files and masks of
the wrong size are reported before training starts, all of them at once, with the files
named. ``test=False`` (what training uses) never reads the test split or the masks.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .images import ImageError, ImageLike, load_image
from .images import load_mask as decode_mask
from .settings import IMAGE_EXTENSIONS, LAYOUTS, TEXTURES, DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFECT_KINDS",
    "DatasetError",
    "Sample",
    "AnomalyDataset",
    "iter_images",
    "detect_layout",
    "load_dataset",
    "perlin_noise",
    "SyntheticDefects",
    "build_texture_dataset",
    "training_tile_boxes",
    "overlapping_tiles",
    "tiles_overlap",
    "download_archive",
]

GOOD = "good"


def iter_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder` (accepted extensions, any case), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


@dataclass(frozen=True)
class Sample:
    """One test image. label: 0 normal, 1 anomalous; mask_path None means no mask file."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    clean_path: Path | None = None  # the same image before its defect, where the set has it


def _resize(img: Image.Image, size: int | None) -> Image.Image:
    if size is None or img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


@dataclass
class AnomalyDataset:
    """Training images (normal) and labelled test samples of one category."""

    root: Path
    layout: str
    category: str
    train: list[Path]
    test: list[Sample]
    has_test_split: bool = True  # False: loaded with test=False, the test split was not read
    _sizes: dict[Path, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})

    @property
    def has_masks(self) -> bool:
        """True when every anomalous test sample has a mask (pixel metrics possible)."""
        return any(s.label for s in self.test) and all(s.mask_path for s in self.test if s.label)

    @property
    def no_masks_reason(self) -> str | None:
        """Why pixel metrics are impossible on this test set (None when every defect image has a
        mask): names the defect types without masks and how many images they hold."""
        if not any(s.label for s in self.test):
            return f"'{self.category}' has no anomalous test images"
        missing: dict[str, int] = {}
        for s in self.test:
            if s.label and s.mask_path is None:
                missing[s.defect_type] = missing.get(s.defect_type, 0) + 1
        if not missing:
            return None
        types = ", ".join(f"{d} ({n} image{'s' if n > 1 else ''})" for d, n in missing.items())
        where = ("no masks folder" if self.layout == "folder"
                 else "no ground_truth/" + "|".join(missing) + " folder")
        return (f"no masks for the defect type(s) {types} of '{self.category}' ({where}); pixel metrics "
                "need a mask for every defect image")

    def test_labels(self) -> np.ndarray:
        return np.array([s.label for s in self.test], dtype=np.int64)

    def load_image(self, item: Path | Sample, size: int | None = None) -> Image.Image:
        """RGB PIL image of a training path or test sample, resized to size x size if given."""
        path = item.path if isinstance(item, Sample) else Path(item)
        img = load_image(path)
        self._sizes[path] = img.size
        return _resize(img, size)

    def load_mask(self, sample: Sample, size: int | None = None) -> np.ndarray:
        """Bool mask (H x W, or size x size by nearest resize); all False for normal samples.

        A pixel is a defect when the mask file's value there is non-zero (`cgdiff.images.load_mask`).
        Raises DatasetError for an anomalous sample without a mask. The mask must have its image's size (checked; the image size is remembered from
        validation or an earlier `load_image`, else the image is decoded once for it).
        """
        if sample.mask_path is None:
            if sample.label:
                raise DatasetError(
                    f"anomalous test image '{sample.path}' has no mask: pixel metrics need one."
                )
            if size is not None:
                return np.zeros((size, size), dtype=bool)
            w, h = self._sizes.get(sample.path) or self.load_image(sample).size
            return np.zeros((h, w), dtype=bool)
        try:
            mask = decode_mask(sample.mask_path)
        except ImageError as e:
            raise DatasetError(f"mask of '{sample.path}' is unreadable: {e}") from None
        expected = self._sizes.get(sample.path) or self.load_image(sample).size
        if mask.shape[::-1] != expected:
            raise DatasetError(_size_message(sample, mask.shape[::-1], expected))
        if size is not None and mask.shape != (size, size):
            pil = Image.fromarray(mask.astype(np.uint8) * 255)
            mask = np.asarray(pil.resize((size, size), Image.Resampling.NEAREST)) > 127
        return mask

    def subset(self, max_train: int | None = None, max_test: int | None = None) -> "AnomalyDataset":
        """A smaller copy for quick runs: the first `max_train` training images, and at most
        `max_test` test samples taken in turn from each group (normal first, then each defect
        type), so both labels and as many defect types as fit are kept. None: keep all."""
        for name, value in (("max_train", max_train), ("max_test", max_test)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, got {value!r}.")
        train = self.train if max_train is None else self.train[:max_train]
        test = self.test
        if max_test is not None and max_test < len(test):
            groups: dict[str, list[int]] = {}
            for i, s in sorted(enumerate(test), key=lambda item: (item[1].label, item[1].defect_type)):
                groups.setdefault(s.defect_type if s.label else "", []).append(i)
            keep: list[int] = []
            for rank in range(max(len(g) for g in groups.values())):
                keep += [g[rank] for g in groups.values() if rank < len(g)]
            test = [test[i] for i in sorted(keep[:max_test])]
        return AnomalyDataset(self.root, self.layout, self.category, list(train), list(test), self.has_test_split,
                              dict(self._sizes))

    def summary(self) -> str:
        if not self.test and not self.has_test_split:
            return (f"{self.category} ({self.layout}, {self.root}): {len(self.train)} train "
                    "(test split not read)")
        n_good = sum(1 for s in self.test if not s.label)
        defects = {d: sum(1 for s in self.test if s.defect_type == d) for d in self.defect_types}
        parts = ", ".join(f"{k} {v}" for k, v in defects.items()) or "none"
        return (
            f"{self.category} ({self.layout}, {self.root}): {len(self.train)} train, "
            f"{n_good} test good, {len(self.test) - n_good} test anomalous ({parts})"
        )


def _size_message(sample: Sample, mask_size: tuple[int, int], image_size: tuple[int, int]) -> str:
    return (
        f"mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} but its image "
        f"'{sample.path}' is {image_size[0]}x{image_size[1]}: masks must match their images."
    )


# --------------------------------------------------------------------------- layouts


def detect_layout(root: str | Path) -> str:
    """'mvtec', 'dtd' or 'folder' from the folder structure of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder '{root}' does not exist or is not a folder.")
    if (root / "train").is_dir() or (root / "test").is_dir():
        test_dirs = {p.name for p in (root / "test").iterdir() if p.is_dir()} if (root / "test").is_dir() else set()
        if "bad" in test_dirs and test_dirs <= {GOOD, "bad"}:
            return "dtd"
        return "mvtec"
    if iter_images(root) or (root / "abnormal").is_dir():
        return "folder"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train" / GOOD).is_dir())
    if classes:
        raise DatasetError(
            f"'{root}' holds several categories ({', '.join(classes[:8])}"
            f"{', ...' if len(classes) > 8 else ''}); pass one category folder, e.g. '{root / classes[0]}'."
        )
    raise DatasetError(
        f"'{root}' has no images and no train/ or test/ folder: expected the MVTec AD layout "
        "(CLASS/train/good, CLASS/test/..., CLASS/ground_truth/...), DTD-Synthetic, or a folder of images."
    )


# CLASS/clean/<defect>/<name>.png: a defect image's clean original (the image before its defect
# was made), written by `build_texture_dataset`; optional. With it `evaluate` measures how much of
# each defect the reconstruction removes (`cgdiff.metrics.removal`).
CLEAN = "clean"


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in iter_images(gt_dir)}


def _find_mask(masks: dict[str, Path], stem: str) -> Path | None:
    return masks.get(f"{stem}_mask") or masks.get(stem)


def _scan_benchmark(root: Path, layout: str, with_test: bool = True) -> tuple[list[Path], list[Sample]]:
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DatasetError(
            f"'{root}' has no train/good folder: the {layout} layout keeps the normal training "
            "images in CLASS/train/good."
        )
    train = iter_images(train_dir)
    if not train:
        raise DatasetError(f"'{train_dir}' contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
    test: list[Sample] = []
    test_root = root / "test"
    if with_test and test_root.is_dir():
        for p in iter_images(test_root / GOOD):
            test.append(Sample(p, 0, GOOD, None))
        for d in sorted(q for q in test_root.iterdir() if q.is_dir() and q.name != GOOD):
            gt_dir = root / "ground_truth" / d.name
            masks = _mask_index(gt_dir)
            cleans = _mask_index(root / CLEAN / d.name)
            for p in iter_images(d):
                mask = _find_mask(masks, p.stem)
                if mask is None and gt_dir.is_dir():  # no folder at all: a type without masks
                    raise DatasetError(
                        f"defect image '{p}' has no mask: expected '{gt_dir / (p.stem + '_mask.png')}'"
                        f"{'' if layout == 'mvtec' else ' or ' + str(gt_dir / (p.stem + '.png'))}."
                    )
                test.append(Sample(p, 1, d.name, mask, cleans.get(p.stem)))
    return train, test


def _scan_folder(root: Path, with_test: bool = True) -> tuple[list[Path], list[Sample]]:
    train = iter_images(root)
    if not train:
        raise DatasetError(
            f"'{root}' contains no normal images ({', '.join(IMAGE_EXTENSIONS)}) directly in it; "
            "the folder layout keeps training images at its top level."
        )
    if not with_test:
        return train, []
    test = [Sample(p, 0, GOOD, None) for p in iter_images(root / "normal_test")]
    mask_dir = root / "masks"
    masks = _mask_index(mask_dir)
    for p in iter_images(root / "abnormal"):
        mask = None
        if mask_dir.is_dir():
            mask = _find_mask(masks, p.stem)
            if mask is None:
                raise DatasetError(
                    f"abnormal image '{p}' has no mask in '{mask_dir}' (expected {p.stem}.png or "
                    f"{p.stem}_mask.png); remove the masks folder for image-level evaluation only."
                )
        test.append(Sample(p, 1, "abnormal", mask))
    return train, test


def load_dataset(
    root: str | Path,
    layout: str = "auto",
    *,
    validate: bool = True,
    skip_unreadable: bool = False,
    test: bool = True,
) -> AnomalyDataset:
    """Read a dataset folder (one category). layout: 'auto', 'mvtec', 'dtd' or 'folder'.

    validate: decode every image and mask once, so that unreadable files and masks of the
    wrong size raise one `DatasetError` naming every such file now rather than mid-training.
    skip_unreadable: leave unreadable images (and defect images with unreadable masks) out
    with a warning instead of raising.
    test: False reads only the training images (the test split and its masks are never
    listed or decoded; `test` is then empty), as training needs.

    A defect type without masks (no ground_truth/DEFECT folder, or a folder layout without a
    masks folder) is accepted: `has_masks` is then False and `no_masks_reason` says why.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder '{root}' does not exist or is not a folder.")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout '{layout}'; use 'auto' or one of {', '.join(LAYOUTS)}.")
    if layout == "folder":
        train, samples = _scan_folder(root, test)
    else:
        train, samples = _scan_benchmark(root, layout, test)
    ds = AnomalyDataset(root=root, layout=layout, category=root.name, train=train, test=samples,
                        has_test_split=test)
    if validate or skip_unreadable:
        _validate(ds, skip_unreadable)
    return ds


def _validate(ds: AnomalyDataset, skip: bool) -> None:
    """Decode every file once; report all bad files together (or skip the unreadable ones)."""
    skipped: list[str] = []
    unreadable: list[str] = []
    wrong_size: list[str] = []

    def readable(path: Path, mask: bool = False) -> bool:
        try:
            if mask:
                ds._sizes[path] = decode_mask(path).shape[::-1]
            else:
                ds.load_image(path)
            return True
        except ImageError as e:
            (skipped if skip else unreadable).append(f"{'mask ' if mask else ''}{e}")
            return False

    ds.train = [p for p in ds.train if readable(p)]
    kept = []
    for s in ds.test:
        if not readable(s.path):
            continue
        if s.mask_path is not None:
            if not readable(s.mask_path, mask=True):
                if skip:
                    skipped.append(f"{s.path} (its mask is unreadable)")
                continue
            mask_size, image_size = ds._sizes[s.mask_path], ds._sizes[s.path]
            if mask_size != image_size:
                wrong_size.append(_size_message(s, mask_size, image_size))
        kept.append(s)
    ds.test = kept
    errors = unreadable + wrong_size
    if errors:
        shown = "; ".join(errors[:20]) + (f"; and {len(errors) - 20} more" if len(errors) > 20 else "")
        what = " and ".join(filter(None, [f"{len(unreadable)} unreadable file(s)" if unreadable else "",
                                          f"{len(wrong_size)} mask(s) of the wrong size" if wrong_size else ""]))
        hint = " (--skip-unreadable leaves unreadable files out)" if unreadable else ""
        raise DatasetError(f"{what} in the dataset '{ds.root}': {shown}{hint}")
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable file(s) in '{ds.root}': " + "; ".join(skipped),
            stacklevel=3,
        )
    if not ds.train:
        raise DatasetError(f"no readable training images left in '{ds.root}'.")


# --------------------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of `shape` with res[0] x res[1] lattice cells, values ~[-1, 1]."""
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grad[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    u, v = _fade(xf), _fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (top * (1 - v) + bottom * v) * math.sqrt(2)


# --------------------------------------------------------------------------- synthetic defects

DEFECT_KINDS = ("texture", "color", "scratch", "hole")


class SyntheticDefects:
    """Seeded DRAEM / DTD-Synthetic style defects on uint8 H x W x 3 images.

    kinds:
      texture  Perlin-shaped region filled with a foreign texture (a crop of one of the
               `foreign` images if given, else a procedural one), mostly opaque;
      color    Perlin-shaped region with a colour and brightness shift;
      scratch  a few thin curved lines, lighter or darker than the surface;
      hole     one or two dark blobs with a shaded rim.

    Guarantees (tested): the mask is non-empty and covers about 0.5-20 % of the image
    (blob defects 3-20 %, scratches less); pixels outside the mask are unchanged; every
    pixel inside the mask changes by at least `min_change` grey levels in some channel.
    The same seed gives the same sequence of defects.
    """

    def __init__(
        self,
        seed: int = 0,
        foreign: Sequence[ImageLike] | None = None,
        area: tuple[float, float] = (0.03, 0.15),
        min_change: int = 16,
    ) -> None:
        if not 0 < area[0] <= area[1] < 0.5:
            raise ValueError(f"area must be fractions 0 < low <= high < 0.5; got {area}.")
        self.rng = np.random.default_rng(seed)
        self.foreign = [np.asarray(load_image(f)) for f in (foreign or [])]
        self.area = area
        self.min_change = int(min_change)

    # -- masks
    def _blob_mask(self, h: int, w: int, fraction: float) -> np.ndarray:
        rng = self.rng
        scale = 2 ** rng.integers(1, 4)  # 2..8 lattice cells across the image
        noise = perlin_noise((h, w), (scale, scale), rng)
        noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, mode="reflect", order=1)
        thr = np.quantile(noise, 1 - fraction)
        return noise > thr

    def _scratch_mask(self, h: int, w: int) -> np.ndarray:
        rng = self.rng
        side = min(h, w)
        mask = np.zeros((h, w), dtype=bool)
        hi = np.array([h - 1, w - 1], dtype=float)
        for _ in range(int(rng.integers(2, 5))):
            # end points and control point inside the image, so the whole curve is inside
            p0 = rng.uniform([0, 0], hi)
            for _ in range(100):
                p2 = rng.uniform([0, 0], hi)
                if np.hypot(*(p2 - p0)) >= 0.4 * side:
                    break
            length = float(np.hypot(*(p2 - p0)))
            p1 = np.clip((p0 + p2) / 2 + rng.normal(0, 0.25 * length, size=2), 0, hi)
            t = np.linspace(0, 1, int(3 * length) + 2)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            pts = np.rint(pts).astype(int)
            mask[pts[:, 0], pts[:, 1]] = True
        radius = max(1, round(side / 160))
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        return ndimage.binary_dilation(mask, structure=yy**2 + xx**2 <= radius**2)

    def _hole_mask(self, h: int, w: int) -> np.ndarray:
        rng = self.rng
        target = rng.uniform(*self.area) * 0.6
        mask = np.zeros((h, w), dtype=bool)
        n = int(rng.integers(1, 3))
        yy, xx = np.mgrid[0:h, 0:w]
        wobble = perlin_noise((h, w), (8, 8), rng)
        for _ in range(n):
            r = math.sqrt(target * h * w / n / np.pi)
            ry, rx = r * rng.uniform(0.7, 1.4), r * rng.uniform(0.7, 1.4)
            cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            mask |= d + 0.35 * wobble < 1
        return mask

    # -- fills
    def _foreign_texture(self, h: int, w: int) -> np.ndarray:
        rng = self.rng
        if self.foreign and rng.random() < 0.8:
            src = self.foreign[int(rng.integers(len(self.foreign)))]
            src = np.rot90(src, int(rng.integers(4)))
            sh, sw = src.shape[:2]
            if sh < h or sw < w:
                k = max(h / sh, w / sw)
                src = np.asarray(Image.fromarray(src).resize((math.ceil(sw * k), math.ceil(sh * k))))
                sh, sw = src.shape[:2]
            y0, x0 = int(rng.integers(sh - h + 1)), int(rng.integers(sw - w + 1))
            tex = src[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
            tex = tex * rng.uniform(0.6, 1.4, size=3) + rng.uniform(-40, 40, size=3)
            return np.clip(tex, 0, 255)
        # procedural: octaves of Perlin noise plus stripes, mapped between two random colours
        n = sum(perlin_noise((h, w), (2**o, 2**o), rng) / 2 ** (o - 2) for o in range(2, 6))
        yy, xx = np.mgrid[0:h, 0:w]
        freq, ang = rng.uniform(0.05, 0.3), rng.uniform(0, np.pi)
        n = n + 0.5 * np.sin(freq * (yy * np.sin(ang) + xx * np.cos(ang)))
        n = (n - n.min()) / (np.ptp(n) + 1e-9)
        c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        return c0 + (c1 - c0) * n[..., None]

    def apply(self, image: ImageLike, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (defect image uint8 H x W x 3, mask bool H x W). kind None picks one at random."""
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            img = image
        else:
            img = np.asarray(load_image(image))
        if kind is None:
            kind = DEFECT_KINDS[int(self.rng.integers(len(DEFECT_KINDS)))]
        if kind not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind '{kind}'; use one of {', '.join(DEFECT_KINDS)}.")
        h, w = img.shape[:2]
        rng = self.rng
        base = img.astype(np.float64)
        out = base.copy()
        if kind == "texture":
            mask = self._blob_mask(h, w, rng.uniform(*self.area))
            alpha = rng.uniform(0.7, 1.0)
            fill = self._foreign_texture(h, w)
            out[mask] = (1 - alpha) * base[mask] + alpha * fill[mask]
        elif kind == "color":
            mask = self._blob_mask(h, w, rng.uniform(*self.area))
            shift = rng.uniform(-40, 40, size=3) + rng.choice([-1, 1]) * rng.uniform(25, 60)
            up = base[mask] + shift
            # reflect the shift where it would clip, so every pixel really moves
            out[mask] = np.where((up < 0) | (up > 255), base[mask] - shift, up)
        elif kind == "scratch":
            mask = self._scratch_mask(h, w)
            level = rng.uniform(70, 130)
            px = base[mask]
            lum = px.mean(axis=1, keepdims=True)
            out[mask] = np.where(lum < 128, px + level, px - level) * rng.uniform(0.9, 1.1, size=3)
        else:  # hole
            mask = self._hole_mask(h, w)
            dist = ndimage.distance_transform_edt(mask)
            depth = np.clip(dist / max(dist.max(), 1.0), 0, 1)[mask][:, None]
            dark = rng.uniform(5, 40) + 30 * (1 - depth) + rng.normal(0, 4, size=(int(mask.sum()), 1))
            out[mask] = dark * rng.uniform(0.9, 1.1, size=3)
        out = np.clip(np.rint(out), 0, 255)
        # guarantee a visible change at every mask pixel (e.g. a dark hole on a dark surface)
        weak = mask & (np.abs(out - base).max(axis=2) < self.min_change)
        if weak.any():
            b = base[weak]
            out[weak] = np.where(b < 128, b + self.min_change, b - self.min_change)
        out[~mask] = base[~mask]
        return out.astype(np.uint8), mask


# --------------------------------------------------------------------------- downloads


def download_archive(url: str, dest: str | Path, progress: bool = True) -> Path:
    """Download an archive (zip, tar, tar.gz, tar.xz, ...) from `url` and unpack it into
    `dest`; returns `dest`. The download is kept as dest/NAME and not fetched again while it is
    there; tar members that would land outside `dest` are refused."""
    import tarfile
    import urllib.parse
    import urllib.request
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    archive = dest / name
    if not archive.is_file():
        partial = archive.with_name(archive.name + ".part")
        with urllib.request.urlopen(url) as response, partial.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        partial.replace(archive)
    root = dest.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise DatasetError(f"'{archive}' holds a path outside the destination: {member}")
            z.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile() or m.isdir()]  # datasets need no links
            for m in members:
                if not (root / m.name).resolve().is_relative_to(root):
                    raise DatasetError(f"'{archive}' holds a path outside the destination: {m.name}")
            t.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    else:
        archive.unlink()  # e.g. a login page instead of the data: do not keep it as the download
        raise DatasetError(f"the download from {url} is not a zip or tar archive (deleted); download the data "
                           f"yourself and unpack it into '{dest}'.")
    return dest


# --------------------------------------------------------------------------- texture dataset


def _texture_photo(name: str) -> np.ndarray:
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"unknown texture '{name}'; scikit-image ships {', '.join(TEXTURES)}.")
    img = getattr(skimage.data, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def build_texture_dataset(
    out_root: str | Path,
    textures: Iterable[str] = TEXTURES,
    tile_size: int = 128,
    holdout_fraction: float = 0.25,
    n_test_good: int = 8,
    n_test_defect: int = 4,
    seed: int = 0,
    kinds: Sequence[str] = DEFECT_KINDS,
    train_stride: int | None = None,
) -> dict[str, Path]:
    """Build an MVTec-layout dataset per texture photo of scikit-image, offline.

    Each 512 x 512 photo is split by rows: the bottom `holdout_fraction` is held out.
    train/good holds tiles (overlapping, every `train_stride` pixels, default tile_size // 2)
    of the top part only; test/good and test/<kind> (n_test_good, and n_test_defect per
    defect kind) are tiles of the held-out part only, the defect ones with synthetic defects
    from `SyntheticDefects` (foreign textures taken from the other photos) and their masks in
    ground_truth/<kind>/NNN_mask.png, and the clean tile before its defect in clean/<kind>/NNN.png
    (for the removal measure of `evaluate`). Each class folder gets a dataset.json recording the split,
    every tile's coordinates and the seed, and a README.md. Returns {texture: class folder}.
    """
    out_root = Path(out_root)
    textures = tuple(textures)
    for k in kinds:
        if k not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind '{k}'; use one of {', '.join(DEFECT_KINDS)}.")
    photos = {name: _texture_photo(name) for name in textures}
    stride = train_stride or max(1, tile_size // 2)
    import skimage

    result: dict[str, Path] = {}
    for name in textures:
        photo = photos[name]
        h, w = photo.shape[:2]
        split = h - int(round(h * holdout_fraction))
        if tile_size > w or tile_size > split or tile_size > h - split:
            raise ValueError(
                f"tile_size {tile_size} does not fit the {h}x{w} photo split at row {split} "
                f"(holdout_fraction {holdout_fraction}): both parts must be at least one tile high."
            )
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        defects = SyntheticDefects(
            seed=int(rng.integers(2**31)),
            foreign=[photos[o] if o in photos else _texture_photo(o) for o in TEXTURES if o != name],
        )
        cls = out_root / name
        tiles: dict[str, dict] = {}

        def crop(y: int, x: int) -> np.ndarray:
            return photo[y : y + tile_size, x : x + tile_size]

        ys = range(0, split - tile_size + 1, stride)
        xs = range(0, w - tile_size + 1, stride)
        i = 0
        for y in ys:
            for x in xs:
                rel = f"train/good/{i:03d}.png"
                _save_png(crop(y, x), cls / rel)
                tiles[rel] = {"y": y, "x": x}
                i += 1

        def test_position() -> tuple[int, int]:
            return int(rng.integers(split, h - tile_size + 1)), int(rng.integers(0, w - tile_size + 1))

        for i in range(n_test_good):
            y, x = test_position()
            rel = f"test/good/{i:03d}.png"
            _save_png(crop(y, x), cls / rel)
            tiles[rel] = {"y": y, "x": x}
        for kind in kinds:
            for i in range(n_test_defect):
                y, x = test_position()
                img, mask = defects.apply(np.ascontiguousarray(crop(y, x)), kind)
                rel = f"test/{kind}/{i:03d}.png"
                mrel = f"ground_truth/{kind}/{i:03d}_mask.png"
                crel = f"{CLEAN}/{kind}/{i:03d}.png"
                _save_png(img, cls / rel)
                _save_png(mask.astype(np.uint8) * 255, cls / mrel)
                _save_png(crop(y, x), cls / crel)
                tiles[rel] = {"y": y, "x": x, "mask": mrel, "clean": crel,
                              "defect_fraction": round(float(mask.mean()), 4)}
        info = {
            "source": f"skimage.data.{name}()",
            "scikit_image_version": skimage.__version__,
            "photo_size": [h, w],
            "tile_size": tile_size,
            "holdout_fraction": holdout_fraction,
            "seed": seed,
            "train_region": {"rows": [0, split], "cols": [0, w]},
            "test_region": {"rows": [split, h], "cols": [0, w]},
            "train_stride": stride,
            "defect_kinds": list(kinds),
            "tiles": tiles,
        }
        (cls / "dataset.json").write_text(json.dumps(info, indent=1))
        (cls / "README.md").write_text(
            f"# {name}: texture set built from scikit-image's `{name}` photo\n\n"
            f"Generated by `cgdiff.data.build_texture_dataset` (seed {seed}). Rows 0-{split} of the "
            f"{h}x{w} photo give the training tiles (train/good); rows {split}-{h} are held out and give "
            f"every test tile (test/good, and test/<kind> with synthetic defects: {', '.join(kinds)}; "
            "masks in ground_truth/<kind>/NNN_mask.png, each defect tile before its defect in "
            "clean/<kind>/NNN.png). Tile coordinates (y, x of the top-left "
            "corner, tile size "
            f"{tile_size}) are in dataset.json.\n"
        )
        result[name] = cls
    return result


def training_tile_boxes(root: str | Path) -> dict[str, tuple[int, int, int]]:
    """{file name: (y, x, side)} of the training tiles of a folder built by
    `build_texture_dataset`, from its dataset.json (pixels of the source photo); {} for any
    other dataset. Such tiles overlap (every tile_size // 2 by default), so a tile kept out of
    training is unseen only if no tile it overlaps is trained on (see `overlapping_tiles`)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"'{path}' is not readable JSON ({e}).") from e
    if not (isinstance(info, dict) and "tiles" in info and "tile_size" in info):
        return {}  # some other dataset's record
    try:
        side = int(info["tile_size"])
        return {Path(rel).name: (int(t["y"]), int(t["x"]), side)
                for rel, t in info["tiles"].items() if rel.startswith("train/good/")}
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"'{path}' is not a readable texture-set record ({e}).") from e


def tiles_overlap(boxes: dict[str, tuple[int, int, int]]) -> bool:
    """Whether any two of the tiles in `boxes` (from `training_tile_boxes`) share a pixel."""
    names = list(boxes)
    return any(overlapping_tiles([n], names[:i], boxes) for i, n in enumerate(names))


def overlapping_tiles(names: Iterable[str], others: Iterable[str],
                      boxes: dict[str, tuple[int, int, int]]) -> set[str]:
    """The tiles of `names` that share at least one photo pixel with a tile of `others`
    (boxes from `training_tile_boxes`; a name without a box overlaps nothing)."""
    def meets(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]

    placed = [boxes[o] for o in others if o in boxes]
    return {n for n in names if n in boxes and any(meets(boxes[n], b) for b in placed)}
