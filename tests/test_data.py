"""transferkit.data (sources, folders, splits, decode) on the datasets in ../shared/datasets and on images made here."""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from transferkit.data import decode as data, sources
from transferkit.data.decode import load_image, load_images
from transferkit.data.folders import scan_folder
from transferkit.data.sources import ImageSet, resolve_source
from transferkit.data.splits import load_splits, stratified_split
from transferkit.errors import DataError


def _first_jpeg(root):
    return sorted((root / "cat").iterdir())[0]


def _save(path, image, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _gray(size=8):
    return np.tile(np.linspace(0, 255, size).round().astype(np.uint8), (size, 1))


def _two_class_folder(root, n=3, size=8):
    for name, value in (("cat", 40), ("dog", 200)):
        for i in range(n):
            _save(root / name / f"{i}.png", Image.new("RGB", (size, size), (value, i, 0)))
    return root


# --------------------------------------------------------------------------------------------
# Discovery and screening
# --------------------------------------------------------------------------------------------

def test_dtd10_with_grayscale_jpegs_loads_as_rgb(datasets):
    images = scan_folder(datasets / "dtd10")
    assert len(images.class_names) == 10 and set(images.class_counts().values()) == {50}
    assert images.paths == sorted(images.paths) and images.skipped == []
    grayscale = [i for i, p in enumerate(images.paths) if Image.open(p).mode == "L"]
    assert grayscale, "dtd10 is expected to hold grayscale JPEGs"
    pixels = load_images(images.paths, 32)
    assert pixels.shape == (500, 32, 32, 3) and pixels.dtype == np.uint8
    gray = pixels[grayscale]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_root_level_files_are_not_classes(datasets):
    images = scan_folder(datasets / "pneumonia28", screen=False)
    assert images.class_names == ["normal", "pneumonia"]
    assert images.class_counts() == {"normal": 1582, "pneumonia": 4256}


def test_bad_files_are_skipped_with_one_warning(datasets, tmp_path):
    root = shutil.copytree(datasets / "cats_dogs", tmp_path / "cats_dogs")
    jpeg = _first_jpeg(root).read_bytes()
    (root / "cat" / "bad.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "note.jpg").write_text("not a picture")
    (root / "dog" / ".DS_Store").write_text("hidden files are ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = scan_folder(root)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1
    assert "skipped 2 files in" in messages[0]
    assert "cat/bad.jpg (truncated image)" in messages[0] and "dog/note.jpg (not an image)" in messages[0]
    assert len(images) == 500 and images.class_counts() == {"cat": 250, "dog": 250}
    assert sorted(os.path.basename(p) for p, _ in images.skipped) == ["bad.jpg", "note.jpg"]


def test_without_screening_non_image_extensions_are_skipped(tmp_path):
    root = _two_class_folder(tmp_path / "pets")
    (root / "cat" / "notes.txt").write_text("about cats")
    with pytest.warns(UserWarning, match=r"cat/notes.txt \(not an image extension\)"):
        images = scan_folder(root, screen=False)
    assert len(images) == 6


def _only_root_files(root):
    _save(root / "readme.png", Image.new("L", (4, 4)))


def _with_empty_class(root):
    _two_class_folder(root)
    (root / "tulip").mkdir()


def _with_unreadable_class(root):
    _two_class_folder(root)
    (root / "notes").mkdir()
    (root / "notes" / "x.jpg").write_text("not an image")


def _one_class(root):
    _save(root / "cat" / "0.png", Image.new("L", (4, 4)))


@pytest.mark.parametrize("make, problem", [
    (lambda root: None, "folder not found"),
    (_only_root_files, "no class folders in .*photos/: expected one sub-folder per class"),
    (_with_empty_class, "class 'tulip' in .*photos/ has no readable images"),
    (_with_unreadable_class, "class 'notes' in .*photos/ has no readable images"),
    (_one_class, r"only one class \('cat'\) in .*photos/: a classifier needs at least two"),
])
def test_folder_errors_name_the_problem(tmp_path, make, problem):
    root = tmp_path / "photos"
    make(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=problem) as raised:
            scan_folder(root)
    assert "photos" in str(raised.value) and "\n" not in str(raised.value)


def test_val_folder_classes_must_be_training_classes(tmp_path):
    train = _two_class_folder(tmp_path / "train")
    val = tmp_path / "val"
    _save(val / "dog" / "a.png", Image.new("RGB", (8, 8)))
    splits = load_splits(train, val=val)
    assert splits.val.class_names == ["cat", "dog"] and splits.val.labels.tolist() == [1]
    assert len(splits.train) == 6 and splits.test is None
    _save(val / "wolf" / "a.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match=r"data.val: class 'wolf' .* not among the training classes"):
        load_splits(train, val=val)


def test_load_splits_errors_name_the_recipe_key(tmp_path):
    with pytest.raises(DataError, match=r"^data.train: folder not found: .*nowhere"):
        load_splits(tmp_path / "nowhere")
    train = _two_class_folder(tmp_path / "train")
    with pytest.raises(DataError, match=r"data.val: 1.5 is not a fraction"):
        load_splits(train, val=1.5)
    with pytest.raises(DataError, match=r"data.val \+ data.test = 1 leaves no training images"):
        load_splits(train, val=0.5, test=0.5)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dtd10(datasets):
    return scan_folder(datasets / "dtd10", screen=False)


def test_stratified_split_matches_sklearn(dtd10):
    kept, held_out = stratified_split(dtd10, 0.2, seed=0)
    assert (len(kept), len(held_out)) == (400, 100)
    assert set(held_out.class_counts().values()) == {10} and set(kept.class_counts().values()) == {40}
    ref_train, ref_test = train_test_split(dtd10.paths, test_size=0.2, stratify=dtd10.labels, random_state=0)
    assert kept.paths == sorted(ref_train) and held_out.paths == sorted(ref_test)
    assert [dtd10.class_names[i] for i in held_out.labels] == [os.path.basename(os.path.dirname(p))
                                                                 for p in held_out.paths]
    assert stratified_split(dtd10, 0.2, seed=0)[1].paths == held_out.paths
    assert stratified_split(dtd10, 0.2, seed=1)[1].paths != held_out.paths


def test_stratified_split_needs_two_images_per_class(dtd10):
    tiny = dtd10.subset(np.r_[0:5, 50])  # 'blotchy' has one image
    with pytest.raises(DataError, match="class 'blotchy' has 1 image"):
        stratified_split(tiny, 0.2, seed=0)


def test_load_splits_fractions_are_of_the_whole_folder(datasets):
    splits = load_splits(datasets / "dtd10", val=0.2, test=0.1, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (350, 100, 50)
    parts = [set(part.paths) for part in (splits.train, splits.val, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(scan_folder(datasets / "dtd10", screen=False).paths)
    assert set(splits.val.class_counts().values()) == {10} and set(splits.test.class_counts().values()) == {5}
    assert splits.class_names == splits.val.class_names == splits.test.class_names


# --------------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------------

def test_builtin_digits_is_written_once(tmp_path, monkeypatch, datasets):
    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path))
    folder = resolve_source("builtin:digits")
    assert folder == tmp_path / "builtin" / "digits"
    digits = scan_folder(folder)
    assert len(digits) == 1797 and digits.class_names == [str(i) for i in range(10)]
    shared = scan_folder(datasets / "digits8", screen=False)  # made the same way from scikit-learn
    assert [os.path.relpath(p, folder) for p in digits.paths] == [os.path.relpath(p, shared.root)
                                                                  for p in shared.paths]
    assert np.array_equal(load_images(digits.paths[:50], 8), load_images(shared.paths[:50], 8))
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == ["digits"]  # no temporary folder left

    monkeypatch.setitem(sources.BUILTINS, "digits", lambda folder: pytest.fail("the cached copy was not reused"))
    assert resolve_source("builtin:digits") == folder
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:mnist': available are builtin:digits"):
        resolve_source("builtin:mnist")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def _rgba_image():
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:4] = (255, 0, 0, 255)  # opaque red
    pixels[4:, :4] = (0, 0, 0, 0)  # fully transparent: white
    pixels[4:, 4:] = (0, 0, 0, 128)  # half-transparent black over white: gray
    return Image.fromarray(pixels)


def _palette_image(transparent):
    image = Image.fromarray(np.repeat(np.arange(8, dtype=np.uint8)[None] % 2, 8, 0), "P")
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # index 0 blue, 1 green
    return image, {"transparency": 0} if transparent else {}


def test_rgba_composites_onto_white(tmp_path):
    pixels = load_image(_save(tmp_path / "a.png", _rgba_image()), 8)
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
    assert (pixels[0, 0] == (255, 0, 0)).all() and (pixels[7, 0] == 255).all()
    assert np.abs(pixels[7, 7].astype(int) - 127).max() <= 1


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images(tmp_path, transparent):
    image, options = _palette_image(transparent)
    pixels = load_image(_save(tmp_path / "p.png", image, **options), 8)
    assert (pixels[:, 1] == (0, 255, 0)).all()
    assert (pixels[:, 0] == ((255, 255, 255) if transparent else (0, 0, 255))).all()


def test_grayscale_with_alpha_and_bilevel(tmp_path):
    la = Image.merge("LA", [Image.fromarray(_gray()), Image.fromarray(np.full((8, 8), 255, np.uint8))])
    la.putpixel((0, 0), (0, 0))
    pixels = load_image(_save(tmp_path / "la.png", la), 8)
    assert (pixels[0, 0] == 255).all() and (pixels[1, :, 0] == _gray()[1]).all()
    bilevel = Image.fromarray(np.indices((8, 8)).sum(0) % 2 == 0)
    pixels = load_image(_save(tmp_path / "b.png", bilevel), 8)
    assert set(np.unique(pixels)) == {0, 255} and pixels[0, 0, 0] == 255 and pixels[0, 1, 0] == 0


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    pixels = load_image(_save(tmp_path / "c.jpg", cmyk, quality=95), 16)
    assert pixels.shape == (16, 16, 3)
    assert pixels[..., 0].mean() < 20 and pixels[..., 1:].mean() > 235


@pytest.mark.parametrize("mode, dtype, name, top", [
    ("I;16", np.uint16, "g.png", 65535),  # type range 0..65535
    ("I;16B", ">u2", "g.tif", 65535),
    ("I", np.int32, "g.tif", 65535),  # 16-bit values held as 32-bit: 0..65535
    ("I", np.int32, "big.tif", 100000),  # beyond 16 bits: the image's own min..max
    ("F", np.float32, "g.tif", 1.0),  # float in 0..1
])
def test_high_bit_depth_is_scaled_not_clipped(tmp_path, mode, dtype, name, top):
    ramp = np.tile(np.linspace(0, top, 16), (16, 1))
    image = Image.fromarray(ramp.astype(dtype) if mode == "F" else ramp.round().astype(dtype))
    assert image.mode == mode
    pixels = load_image(_save(tmp_path / name, image), 16)
    row = pixels[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) > 0).all()
    assert np.abs(row - np.linspace(0, 255, 16)).max() <= 1
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_exif_orientation_is_applied(tmp_path):
    halves = np.zeros((4, 8), np.uint8)
    halves[:, 4:] = 255  # left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the left half ends on top
    pixels = load_image(_save(tmp_path / "o.png", Image.fromarray(halves), exif=exif), 8)[..., 0]
    assert pixels[:3].max() < 30 and pixels[5:].min() > 225


def test_large_jpegs_decode_in_draft_mode_close_to_full(tmp_path):
    y, x = np.mgrid[0:1024, 0:768]
    photo = np.stack([x % 256, y % 256, (x + y) // 8 % 256], -1).astype(np.uint8)
    path = _save(tmp_path / "big.jpg", Image.fromarray(photo), quality=95)
    full = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    pixels = load_image(path, 64)
    assert pixels.shape == (64, 64, 3) and np.abs(pixels.astype(int) - full).mean() < 3


def test_one_resize_for_files_uint8_and_float_pixels(datasets):
    path = _first_jpeg(datasets / "cats_dogs")
    pixels = load_image(path, 160)
    image = Image.fromarray(pixels)
    expected = np.asarray(image.resize((96, 96), Image.Resampling.BILINEAR))
    assert np.array_equal(data.resize(image, 96), expected) and np.array_equal(data.resize(pixels, 96), expected)
    floats = data.resize(pixels.astype(np.float64) + 0.25, 96)  # per channel as float32: not rounded
    assert floats.dtype == np.float32 and np.abs(floats - 0.25 - expected).max() <= 1
    assert not np.array_equal(floats, floats.round())
    batch = np.stack([pixels, pixels[::-1]])
    assert data.resize_all(batch, 160) is batch
    assert np.array_equal(data.resize_all(batch, 96), np.stack([expected, data.resize(pixels[::-1], 96)]))
    assert data.resize_all(batch[:0], 96).shape == (0, 96, 96, 3)

def test_importing_data_and_augment_loads_no_tensorflow_or_keras():
    code = ("import sys, transferkit.data.sources, transferkit.data.folders, transferkit.data.splits, "
            "transferkit.data.decode, transferkit.data.augment; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_image_set_subset_and_counts():
    images = ImageSet(["/a/x/1.png", "/a/x/2.png", "/a/y/3.png"], np.array([0, 0, 1]), ["x", "y", "z"], "/a")
    part = images.subset([2, 0])
    assert part.paths == ["/a/y/3.png", "/a/x/1.png"] and part.labels.tolist() == [1, 0] and len(part) == 2
    assert images.class_counts() == {"x": 2, "y": 1, "z": 0}


@pytest.fixture(scope="module")
def pets(datasets):
    images = scan_folder(datasets / "cats_dogs", screen=False)
    return images.subset(np.r_[0:10, 250:260])


def test_copied_or_linked_subset_reads_back_as_the_same_dataset(pets, tmp_path):
    copied = scan_folder(pets.copy_to(tmp_path / "copied"))
    linked = scan_folder(pets.link_to(tmp_path / "linked"), follow_links=True)  # links out of the folder
    for subset in (copied, linked):
        assert subset.class_names == pets.class_names and subset.labels.tolist() == pets.labels.tolist()
        assert [os.path.basename(p) for p in subset.paths] == [os.path.basename(p) for p in pets.paths]
    assert not any(os.path.islink(p) for p in copied.paths)
    assert [os.path.realpath(p) for p in linked.paths] == [os.path.realpath(p) for p in pets.paths]
