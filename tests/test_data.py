import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgdiff.data import (
    DEFECT_KINDS,
    AnomalyDataset,
    DatasetError,
    Sample,
    SyntheticDefects,
    build_texture_dataset,
    detect_layout,
    iter_images,
    load_dataset,
    perlin_noise,
)

SIZE = 16


def _img(path: Path, value=100, size=SIZE, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(abs(hash(path.name)) % 2**32).integers(0, 255, (size, size, 3), dtype=np.uint8)
    arr[..., 0] = value
    im = Image.fromarray(arr)
    (im.convert("L") if mode == "L" else im).save(path)
    return path


def _mask(path: Path, box=(2, 6, 3, 9), size=SIZE):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)
    return path


def make_mvtec(root: Path) -> Path:
    _img(root / "train/good/000.png")
    _img(root / "train/good/001.png", mode="L")  # grey and RGB mixed: converted, not refused
    _img(root / "test/good/000.png")
    for d in ("cut", "poke"):
        for i in range(2):
            _img(root / f"test/{d}/{i:03d}.png")
            _mask(root / f"ground_truth/{d}/{i:03d}_mask.png")
    return root


# --------------------------------------------------------------------------- listing / layouts


def test_iter_images_filters_and_sorts(tmp_path):
    for name in ("b.png", "A.JPG", "c.txt", ".hidden.png", "d.webp", "e.tiff", "f.bmp", "g.jpeg", "h.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    names = [p.name for p in iter_images(tmp_path)]
    assert names == sorted(["b.png", "A.JPG", "d.webp", "e.tiff", "f.bmp", "g.jpeg", "h.tif"])
    assert iter_images(tmp_path / "missing") == []


def test_mvtec_layout(tmp_path):
    root = make_mvtec(tmp_path / "carpet")
    ds = load_dataset(root)
    assert isinstance(ds, AnomalyDataset)
    assert (ds.layout, ds.category) == ("mvtec", "carpet")
    assert [p.name for p in ds.train] == ["000.png", "001.png"]
    assert ds.defect_types == ["cut", "poke"]
    assert ds.test_labels().tolist() == [0, 1, 1, 1, 1]
    good, cut0 = ds.test[0], ds.test[1]
    assert good == Sample(root / "test/good/000.png", 0, "good", None)
    assert cut0.mask_path == root / "ground_truth/cut/000_mask.png"
    assert ds.has_masks
    # grey training image comes back as RGB
    assert ds.load_image(ds.train[1]).mode == "RGB"
    assert ds.load_image(ds.train[1], size=8).size == (8, 8)
    # masks: native size, nearest resize, normal all-zero
    m = ds.load_mask(cut0)
    assert m.dtype == bool and m.shape == (SIZE, SIZE) and m.sum() == 4 * 6
    m2 = ds.load_mask(cut0, size=32)
    assert m2.shape == (32, 32) and m2.sum() == 4 * 4 * 6 and m2[4:12, 6:18].all()
    assert not ds.load_mask(good, size=32).any() and ds.load_mask(good, size=32).shape == (32, 32)
    assert ds.load_mask(good).shape == (SIZE, SIZE)
    assert "2 train, 1 test good, 4 test anomalous" in ds.summary()


@pytest.mark.parametrize("mask_name", ["000.png", "000_mask.png"])
def test_dtd_layout(tmp_path, mask_name):
    root = tmp_path / "Woven_001"
    _img(root / "train/good/000.png")
    _img(root / "test/good/000.png")
    _img(root / "test/bad/000.png")
    _mask(root / "ground_truth/bad" / mask_name)
    assert detect_layout(root) == "dtd"
    ds = load_dataset(root)
    assert ds.layout == "dtd" and ds.defect_types == ["bad"]
    assert ds.test[1].mask_path.name == mask_name
    assert ds.load_mask(ds.test[1]).sum() == 24
    # the layout can be forced
    assert load_dataset(root, layout="mvtec").layout == "mvtec"


def test_folder_layout(tmp_path):
    root = tmp_path / "mine"
    for i in range(3):
        _img(root / f"n{i}.png")
    _img(root / "normal_test/t0.jpg")
    _img(root / "abnormal/a0.png")
    _img(root / "abnormal/a1.png")
    ds = load_dataset(root)
    assert ds.layout == "folder" and len(ds.train) == 3
    assert ds.test_labels().tolist() == [0, 1, 1]
    assert not ds.has_masks  # no masks folder: image-level evaluation only
    with pytest.raises(DatasetError, match="a0.png' has no mask"):
        ds.load_mask(ds.test[1])
    _mask(root / "masks/a0.png")
    with pytest.raises(DatasetError, match="abnormal image .*a1.png' has no mask"):
        load_dataset(root)
    _mask(root / "masks/a1_mask.png")
    ds = load_dataset(root)
    assert ds.has_masks and ds.load_mask(ds.test[2]).any()


def test_layout_override_and_unknown(tmp_path):
    root = make_mvtec(tmp_path / "c")
    with pytest.raises(DatasetError, match="no normal images .*directly in it"):
        load_dataset(root, layout="folder")
    with pytest.raises(DatasetError, match="unknown layout 'voc'"):
        load_dataset(root, layout="voc")


# --------------------------------------------------------------------------- errors


def test_missing_or_empty_train_good(tmp_path):
    root = tmp_path / "c"
    _img(root / "test/good/000.png")
    with pytest.raises(DatasetError, match="no train/good folder"):
        load_dataset(root)
    (root / "train/good").mkdir(parents=True)
    (root / "train/good/notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="contains no images"):
        load_dataset(root)
    assert issubclass(DatasetError, ValueError)


def test_missing_folder_and_collection_of_classes(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    make_mvtec(tmp_path / "mvtec" / "carpet")
    make_mvtec(tmp_path / "mvtec" / "grid")
    with pytest.raises(DatasetError, match="several categories \\(carpet, grid\\)"):
        load_dataset(tmp_path / "mvtec")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path / "empty")


def test_unreadable_image_named_or_skipped(tmp_path):
    root = make_mvtec(tmp_path / "c")
    bad = root / "train/good/002.png"
    bad.write_bytes(b"not a png at all")
    badtest = root / "test/cut/000.png"
    badtest.write_bytes(b"")
    with pytest.raises(DatasetError, match="002.png"):
        load_dataset(root)
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as rec:
        ds = load_dataset(root, skip_unreadable=True)
    assert "002.png" in str(rec[0].message) and "000.png" in str(rec[0].message)
    assert bad not in ds.train and len(ds.train) == 2
    assert badtest not in [s.path for s in ds.test] and len(ds.test) == 4
    # without validation the listing is cheap, and the error appears when the file is read
    ds = load_dataset(root, validate=False)
    assert bad in ds.train


def test_unreadable_mask(tmp_path):
    root = make_mvtec(tmp_path / "c")
    (root / "ground_truth/poke/001_mask.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="1 unreadable file.*mask .*001_mask.png"):
        load_dataset(root)
    with pytest.warns(UserWarning, match="its mask is unreadable"):
        ds = load_dataset(root, skip_unreadable=True)
    assert len(ds.test) == 4


def test_defect_without_mask(tmp_path):
    root = make_mvtec(tmp_path / "c")
    (root / "ground_truth/poke/001_mask.png").unlink()
    with pytest.raises(DatasetError, match="defect image .*poke/001.png' has no mask.*001_mask.png"):
        load_dataset(root)


def test_mask_size_must_match_image(tmp_path):
    root = make_mvtec(tmp_path / "c")
    _mask(root / "ground_truth/cut/001_mask.png", size=SIZE * 2)
    with pytest.raises(DatasetError, match="is 32x32 but its image .* is 16x16"):
        load_dataset(root)
    ds = load_dataset(root, validate=False)  # also caught when the mask is loaded later
    with pytest.raises(DatasetError, match="32x32"):
        ds.load_mask(ds.test[2], size=8)


# --------------------------------------------------------------------------- real data


def test_leather_subset_loads(leather_root):
    ds = load_dataset(leather_root)
    assert ds.layout == "mvtec" and ds.category == "leather"
    assert len(ds.train) == 4
    labels = ds.test_labels()
    assert (labels == 0).sum() == 4 and (labels == 1).sum() == 11
    assert set(ds.defect_types) <= {"color", "cut", "fold", "glue", "poke"}
    for s in ds.test:
        m = ds.load_mask(s, size=256)
        assert m.shape == (256, 256)
        assert m.any() == bool(s.label), s.path
    img = ds.load_image(ds.test[-1])
    assert img.mode == "RGB" and img.size == (1024, 1024)


# --------------------------------------------------------------------------- synthetic defects


def test_perlin_noise_properties():
    a = perlin_noise((64, 96), (4, 6), np.random.default_rng(0))
    b = perlin_noise((64, 96), (4, 6), np.random.default_rng(0))
    assert a.shape == (64, 96) and np.array_equal(a, b)
    assert -1.5 < a.min() < -0.2 and 0.2 < a.max() < 1.5
    # smooth: neighbouring pixels differ much less than the overall range
    assert np.abs(np.diff(a, axis=1)).max() < 0.2 * np.ptp(a)
    assert not np.array_equal(a, perlin_noise((64, 96), (4, 6), np.random.default_rng(1)))


def _texture(size=128):
    import skimage.data

    g = skimage.data.brick()[:size, :size]
    return np.repeat(g[..., None], 3, axis=2)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("base", ["texture", "flat", "white", "black"])
def test_each_defect_changes_every_mask_pixel(kind, base):
    img = {
        "texture": _texture(),
        "flat": np.full((128, 128, 3), 128, np.uint8),
        "white": np.full((128, 128, 3), 255, np.uint8),
        "black": np.zeros((128, 128, 3), np.uint8),
    }[base]
    gen = SyntheticDefects(seed=1, min_change=16)
    for _ in range(3):
        out, mask = gen.apply(img, kind)
        assert out.dtype == np.uint8 and out.shape == img.shape and mask.shape == img.shape[:2]
        frac = mask.mean()
        assert 0.005 <= frac <= 0.2, (kind, frac)
        diff = np.abs(out.astype(int) - img.astype(int)).max(axis=2)
        assert (diff[mask] >= 16).all()
        assert (diff[~mask] == 0).all()


def test_blob_defects_cover_a_few_percent():
    gen = SyntheticDefects(seed=2)
    img = _texture()
    fracs = [gen.apply(img, k)[1].mean() for k in ("texture", "color") for _ in range(5)]
    assert min(fracs) >= 0.02 and max(fracs) <= 0.2


def test_defects_are_deterministic_for_a_seed():
    img = _texture(96)
    grass = np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)

    def run(seed):
        gen = SyntheticDefects(seed=seed, foreign=[grass])
        return [gen.apply(img) for _ in range(6)]

    a, b, c = run(5), run(5), run(6)
    for (ia, ma), (ib, mb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert any(not np.array_equal(ma, mc) for (_, ma), (_, mc) in zip(a, c))


def test_defect_inputs_and_errors():
    gen = SyntheticDefects(seed=0)
    grey = _texture(64)[..., 0]
    out, mask = gen.apply(grey, "color")  # grey input converted through load_image
    assert out.shape == (64, 64, 3) and mask.any()
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        gen.apply(grey, "dent")
    with pytest.raises(ValueError, match="area"):
        SyntheticDefects(area=(0.3, 0.1))


# --------------------------------------------------------------------------- texture dataset


def test_build_texture_dataset(tmp_path):
    import skimage.data

    out = build_texture_dataset(
        tmp_path / "tex", textures=("brick", "gravel"), tile_size=64, holdout_fraction=0.25,
        n_test_good=6, n_test_defect=2, seed=0,
    )
    assert set(out) == {"brick", "gravel"}
    root = out["brick"]
    info = json.loads((root / "dataset.json").read_text())
    assert (root / "README.md").exists() and info["seed"] == 0
    split = info["train_region"]["rows"][1]
    assert split == 384 and info["test_region"]["rows"] == [384, 512]
    t = info["tile_size"]
    n_train = n_test = 0
    tiles = [
        (folder, getattr(skimage.data, name)(), rel, c)
        for name, folder in out.items()
        for rel, c in json.loads((folder / "dataset.json").read_text())["tiles"].items()
    ]
    for root, photo, rel, c in tiles:
        arr = np.asarray(Image.open(root / rel))[..., 0]
        crop = photo[c["y"] : c["y"] + t, c["x"] : c["x"] + t]
        if rel.startswith("train/"):
            n_train += 1
            assert c["y"] + t <= split, rel  # training never sees the held-out rows
            assert np.array_equal(arr, crop)  # and the recorded coordinates are honest
        else:
            n_test += 1
            assert c["y"] >= split, rel  # no test tile overlaps the training region
            if "mask" in c:
                mask = np.asarray(Image.open(root / c["mask"])) > 127
                assert mask.shape == arr.shape and 0 < mask.mean() < 0.25
                assert np.array_equal(arr[~mask], crop[~mask])
                assert not np.array_equal(arr[mask], crop[mask])
            else:
                assert np.array_equal(arr, crop)
    assert n_train == 2 * 11 * 15 and n_test == 2 * (6 + 2 * len(DEFECT_KINDS))

    root = out["brick"]
    ds = load_dataset(root)
    assert len(ds.test) == 6 + 2 * len(DEFECT_KINDS)
    assert ds.layout == "mvtec" and len(ds.train) == n_train // 2
    assert sorted(ds.defect_types) == sorted(DEFECT_KINDS)
    assert ds.test_labels().sum() == 2 * len(DEFECT_KINDS)
    for s in ds.test:
        assert ds.load_mask(s).any() == bool(s.label)

    again = build_texture_dataset(
        tmp_path / "tex2", textures=("brick",), tile_size=64, n_test_good=6, n_test_defect=2, seed=0
    )
    assert (again["brick"] / "dataset.json").read_text() == (root / "dataset.json").read_text()
    for rel in ("test/scratch/001.png", "ground_truth/texture/000_mask.png"):
        assert (again["brick"] / rel).read_bytes() == (root / rel).read_bytes()


def test_build_texture_dataset_rejects_a_too_small_holdout(tmp_path):
    with pytest.raises(ValueError, match="at least one tile high"):
        build_texture_dataset(tmp_path, textures=("grass",), tile_size=128, holdout_fraction=0.1)


# --------------------------------------------------------------------------- subsets and downloads


def test_subset_keeps_both_labels_and_spreads_over_defect_types(tmp_path):
    ds = load_dataset(make_mvtec(tmp_path / "carpet"))
    small = ds.subset(max_train=1, max_test=3)
    assert [p.name for p in small.train] == ["000.png"]
    assert [(s.defect_type, s.path.name) for s in small.test] == [("good", "000.png"), ("cut", "000.png"),
                                                                   ("poke", "000.png")]
    assert [s.defect_type for s in ds.subset(max_test=4).test] == ["good", "cut", "cut", "poke"]
    assert ds.subset().test == ds.test and len(ds.test) == 5  # the original is left alone
    assert ds.subset(max_test=2).test_labels().tolist() == [0, 1]
    with pytest.raises(ValueError, match="max_test"):
        ds.subset(max_test=0)


@pytest.mark.parametrize("fmt", ["zip", "gztar", "xztar"])
def test_download_archive_unpacks_and_keeps_the_download(tmp_path, fmt):
    import shutil

    from cgdiff.data import download_archive

    make_mvtec(tmp_path / "src" / "carpet")
    archive = shutil.make_archive(str(tmp_path / "mvtec"), fmt, tmp_path / "src")
    dest = download_archive(Path(archive).as_uri(), tmp_path / "data", progress=False)
    got, original = load_dataset(dest / "carpet"), load_dataset(tmp_path / "src" / "carpet")
    assert [p.name for p in got.train] == [p.name for p in original.train] and got.defect_types == ["cut", "poke"]
    assert len(got.test) == len(original.test) and got.has_masks
    assert (dest / Path(archive).name).is_file()


def test_download_archive_refuses_what_is_not_an_archive_or_escapes(tmp_path):
    import tarfile

    from cgdiff.data import download_archive

    page = tmp_path / "login.html"
    page.write_text("<html>accept the licence first</html>")
    with pytest.raises(DatasetError, match="not a zip or tar archive"):
        download_archive(page.as_uri(), tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "login.html").exists()  # not kept as if it were the data
    evil = tmp_path / "evil.tar"
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(evil, "w") as t:
        t.add(tmp_path / "x.txt", arcname="../outside.txt")
    with pytest.raises(DatasetError, match="outside the destination"):
        download_archive(evil.as_uri(), tmp_path / "data2", progress=False)
    assert not (tmp_path / "outside.txt").exists()


# --------------------------------------------------------------------------- masks of any encoding


def _box(size=SIZE, box=(2, 6, 3, 9)):
    m = np.zeros((size, size), bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def _mask_encodings(m: np.ndarray) -> dict:
    """The same defect region as the mask files annotation tools and data sets write."""
    grey = m.astype(np.uint8)
    palette = Image.fromarray(grey, "P")
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)  # index 1: a red defect
    rgb = np.zeros(m.shape + (3,), np.uint8)
    rgb[m] = (0, 0, 90)  # a dark blue annotation: non-zero in one channel only
    rgba = np.zeros(m.shape + (4,), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent background
    rgba[m] = (255, 0, 0, 255)
    return {
        "L 0/255.png": Image.fromarray(grey * 255),
        "L 0/1.png": Image.fromarray(grey),
        "L level 100 (MVTec LOCO).png": Image.fromarray(grey * 100),
        "mode 1.png": Image.fromarray(m),
        "palette.png": palette,
        "palette.gif": palette,
        "RGB.png": Image.fromarray(rgb),
        "RGBA.png": Image.fromarray(rgba, "RGBA"),
        "LA.png": Image.fromarray(np.stack([grey * 255, grey * 255], -1), "LA"),
        "16-bit value 1.png": Image.fromarray(m.astype(np.uint16)),
        "16-bit value 1000.tif": Image.fromarray(m.astype(np.uint16) * 1000),
        "16-bit 65535.png": Image.fromarray(m.astype(np.uint16) * 65535),
        "float 0.5.tif": Image.fromarray(m.astype(np.float32) * 0.5),
        "L level 100.bmp": Image.fromarray(grey * 100),
        "L level 100.tif": Image.fromarray(grey * 100),
    }


@pytest.mark.parametrize("name", list(_mask_encodings(_box())))
def test_a_mask_pixel_is_a_defect_when_non_zero_whatever_the_encoding(tmp_path, name):
    root = make_mvtec(tmp_path / "c")
    expected = _box()
    target = root / "ground_truth/cut" / ("000_mask" + Path(name).suffix)
    (root / "ground_truth/cut/000_mask.png").unlink()
    _mask_encodings(expected)[name].save(target)
    ds = load_dataset(root)
    sample = ds.test[1]
    assert sample.mask_path == target
    assert np.array_equal(ds.load_mask(sample), expected)
    resized = np.asarray(Image.fromarray(expected).resize((32, 32), Image.Resampling.NEAREST))
    assert np.array_equal(ds.load_mask(sample, size=32), resized)


def test_load_mask_takes_arrays_and_tensors_by_the_same_rule():
    import torch

    from cgdiff.images import load_mask

    m = _box()
    for source in (m, m.astype(np.uint8) * 100, m.astype(np.uint16), m.astype(np.float32) * 0.2,
                   torch.from_numpy(m.astype(np.uint8))[None], np.stack([m.astype(np.uint8)] * 3, -1)):
        assert np.array_equal(load_mask(source), m)
    with pytest.raises(Exception, match="NaN"):
        load_mask(np.full((SIZE, SIZE), np.nan, np.float32))


# --------------------------------------------------------------------------- test split and bad files


def test_a_defect_type_without_masks_gives_image_metrics_only_and_training_never_reads_the_test_split(tmp_path):
    root = make_mvtec(tmp_path / "grid")
    _img(root / "test/thread/000.png")  # a defect type with no ground_truth/thread folder
    ds = load_dataset(root)
    assert ds.defect_types == ["cut", "poke", "thread"] and not ds.has_masks
    assert "thread (1 image)" in ds.no_masks_reason and "ground_truth/thread" in ds.no_masks_reason
    with pytest.raises(DatasetError, match="thread/000.png' has no mask"):
        ds.load_mask(ds.test[-1])
    # a missing mask inside an existing ground_truth folder is still an error
    (root / "ground_truth/cut/001_mask.png").unlink()
    with pytest.raises(DatasetError, match="cut/001.png' has no mask"):
        load_dataset(root)
    # training reads train/good only: broken test files and missing masks do not matter
    (root / "test/poke/000.png").write_bytes(b"broken")
    train_only = load_dataset(root, test=False)
    assert train_only.test == [] and len(train_only.train) == 2
    assert "test split not read" in train_only.summary()


def test_every_bad_file_is_named_at_once(tmp_path):
    root = make_mvtec(tmp_path / "c")
    for rel in ("train/good/000.png", "test/good/000.png", "ground_truth/poke/001_mask.png"):
        (root / rel).write_bytes(b"not an image")
    _mask(root / "ground_truth/cut/001_mask.png", size=SIZE * 2)
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    message = str(info.value)
    assert message.startswith("3 unreadable file(s) and 1 mask(s) of the wrong size")
    for rel in ("train/good/000.png", "test/good/000.png", "poke/001_mask.png", "cut/001_mask.png"):
        assert rel in message, rel
