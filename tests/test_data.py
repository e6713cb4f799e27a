"""transferkit.data on the real datasets in ../shared/datasets and on images made here."""

import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from transferkit import data
from transferkit.data import (ImageSet, load_image, load_images, load_splits, make_dataset, resolve_source,
                              scan_folder, stratified_split)
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
    assert "skipped 2 unreadable files" in messages[0]
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

    monkeypatch.setitem(data.BUILTINS, "digits", lambda folder: pytest.fail("the cached copy was not reused"))
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


# --------------------------------------------------------------------------------------------
# Input pipelines
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pets(datasets):
    images = scan_folder(datasets / "cats_dogs", screen=False)
    return images.subset(np.r_[0:10, 250:260])


def _batches(dataset):
    return [tuple(np.asarray(part) for part in batch) for batch in dataset]


def test_both_pipelines_give_identical_batches(pets):
    tf_batches = _batches(make_dataset(pets, 32, 8, pipeline="tf"))
    py_batches = _batches(make_dataset(pets, 32, 8, pipeline="pydataset"))
    assert [len(y) for _, y in tf_batches] == [len(y) for _, y in py_batches] == [8, 8, 4]
    expected = load_images(pets.paths, 32).astype(np.float32)
    for (tx, ty), (px, py) in zip(tf_batches, py_batches):
        assert tx.dtype == px.dtype == np.float32 and ty.dtype == py.dtype == np.int32
        assert np.array_equal(tx, px) and np.array_equal(ty, py)
    assert np.array_equal(np.concatenate([x for x, _ in tf_batches]), expected)
    assert np.concatenate([y for _, y in tf_batches]).tolist() == pets.labels.tolist()


def test_auto_pipeline_is_tf_data_under_tensorflow(pets):
    import tensorflow as tf

    assert isinstance(make_dataset(pets, 8, pipeline="auto"), tf.data.Dataset)
    with pytest.raises(ValueError, match="pipeline must be one of"):
        make_dataset(pets, 8, pipeline="torch")


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_shuffle_is_seeded_and_redrawn_each_epoch(pets, pipeline):
    def epochs(seed):
        dataset = make_dataset(pets, 8, 5, shuffle=True, seed=seed, pipeline=pipeline)
        orders = []
        for _ in range(2):
            orders.append([float(image.sum()) for x, _ in _batches(dataset) for image in x])
            if pipeline == "pydataset":
                dataset.on_epoch_end()  # what Model.fit calls
        return orders

    first, second = epochs(seed=1)
    assert epochs(seed=1) == [first, second]
    assert first != second and sorted(first) == sorted(second)
    assert epochs(seed=2)[0] != first


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_augmentation_runs_on_batches(pets, pipeline):
    from transferkit.augment import build_augmentation

    augment = build_augmentation([{"random_flip": "horizontal"}], seed=0)
    ((x, y),) = _batches(make_dataset(pets, 32, 20, augment=augment, pipeline=pipeline))
    plain = load_images(pets.paths, 32).astype(np.float32)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    flipped = [np.array_equal(a, b[:, ::-1]) for a, b in zip(x, plain)]
    unchanged = [np.array_equal(a, b) for a, b in zip(x, plain)]
    assert all(f or u for f, u in zip(flipped, unchanged)) and any(flipped) and not np.array_equal(x, plain)


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_batches_train_a_keras_model(pets, pipeline):
    import keras

    from transferkit.augment import build_augmentation

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    augment = build_augmentation(["random_flip", {"random_contrast": 0.2}], seed=0)
    train = make_dataset(pets, 32, 8, shuffle=True, augment=augment, pipeline=pipeline)
    history = model.fit(train, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    probabilities = model.predict(make_dataset(pets, 32, 8, pipeline=pipeline), verbose=0)
    assert probabilities.shape == (20, 2)


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_one_hot_labels_and_batch_mixing(pets, pipeline):
    from transferkit.augment import BatchMixer

    ((x, y),) = _batches(make_dataset(pets, 32, 20, num_classes=2, pipeline=pipeline))
    assert y.dtype == np.float32 and np.array_equal(y.argmax(axis=1), pets.labels) and np.all(y.sum(axis=1) == 1)
    ((mx, my),) = _batches(make_dataset(pets, 32, 20, num_classes=2, pipeline=pipeline,
                                        mix=BatchMixer(mixup=0.4, seed=0)))
    assert mx.shape == x.shape and not np.array_equal(mx, x)
    np.testing.assert_allclose(my.sum(axis=1), 1, atol=1e-6)
    assert np.any((my > 0) & (my < 1))  # soft targets
    with pytest.raises(ValueError, match="mix needs one-hot labels"):
        make_dataset(pets, 32, mix=BatchMixer(mixup=0.4), pipeline=pipeline)


def _count_decodes(monkeypatch) -> list:
    """The paths decoded from now on, in order."""
    calls = []
    load_image = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path, size: calls.append(path) or load_image(path, size))
    return calls


def _two_epochs(dataset, pipeline):
    epochs = []
    for _ in range(2):
        epochs.append(_batches(dataset))
        if pipeline == "pydataset":
            dataset.on_epoch_end()  # what Model.fit calls
    return epochs


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_cached_batches_equal_decoded_ones_and_decode_once(pets, pipeline, monkeypatch):
    plain = _batches(make_dataset(pets, 32, 8, pipeline=pipeline))
    calls = _count_decodes(monkeypatch)
    epochs = _two_epochs(make_dataset(pets, 32, 8, shuffle=True, seed=3, pipeline=pipeline, cache=True), pipeline)
    assert len(calls) == len(pets)  # the second epoch decoded nothing
    assert epochs[0][0][0].dtype == np.float32
    for epoch in epochs:  # a shuffled order of exactly the same images and labels
        assert sorted(float(x.sum()) for b, _ in epoch for x in b) == sorted(float(x.sum()) for b, _ in plain for x in b)
    assert [float(x.sum()) for b, _ in epochs[0] for x in b] != [float(x.sum()) for b, _ in epochs[1] for x in b]


def test_pydataset_decodes_the_next_batches_ahead_in_order(pets, monkeypatch):
    decoded = []
    load_images = data.load_images
    monkeypatch.setattr(data, "load_images", lambda paths, size: decoded.append(list(paths)) or load_images(paths, size))
    dataset = make_dataset(pets, 32, 4, pipeline="pydataset")
    x, _ = dataset[0]
    deadline = time.monotonic() + 30
    while len(decoded) < 1 + data.PREFETCH and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decoded == [pets.paths[i:i + 4] for i in range(0, 4 * (1 + data.PREFETCH), 4)]
    x1, _ = dataset[1]  # served from the prefetched decode, not decoded again
    assert decoded.count(pets.paths[4:8]) == 1
    np.testing.assert_array_equal(x1, load_images(pets.paths[4:8], 32).astype(np.float32))


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_a_bounded_cache_keeps_some_images_and_decodes_the_rest_each_epoch(pets, pipeline, monkeypatch):
    plain = _batches(make_dataset(pets, 32, 8, pipeline=pipeline))
    calls = _count_decodes(monkeypatch)
    in_order = _batches(make_dataset(pets, 32, 8, pipeline=pipeline, cache=7))
    assert len(calls) == len(pets)
    for (x, y), (px, py) in zip(in_order, plain):  # without a shuffle the order is the files'
        assert np.array_equal(x, px) and np.array_equal(y, py)
    calls.clear()
    epochs = _two_epochs(make_dataset(pets, 32, 8, shuffle=True, seed=3, pipeline=pipeline, cache=7), pipeline)
    assert len(calls) == len(pets) + len(pets) - 7  # the second epoch decoded all but the 7 kept
    for epoch in epochs:  # every image once per epoch
        assert sorted(float(x.sum()) for b, _ in epoch for x in b) == sorted(float(x.sum()) for b, _ in plain for x in b)


def test_cache_limit_keeps_as_many_images_as_fit():
    from transferkit.data import cache_limit

    assert cache_limit("auto", 1000, 224) == 1000
    assert 0 < cache_limit("auto", 10**9, 224) < 10**9  # a bound: as many as fit, not all or nothing
    assert cache_limit(True, 10**9, 224) == 10**9 and cache_limit(False, 1, 8) == 0
    assert cache_limit(7, 20, 32) == 7 and cache_limit(50, 20, 32) == 20


def test_importing_data_and_augment_loads_no_tensorflow_or_keras():
    code = ("import sys, transferkit.data, transferkit.augment; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_image_set_subset_and_counts():
    images = ImageSet(["/a/x/1.png", "/a/x/2.png", "/a/y/3.png"], np.array([0, 0, 1]), ["x", "y", "z"], "/a")
    part = images.subset([2, 0])
    assert part.paths == ["/a/y/3.png", "/a/x/1.png"] and part.labels.tolist() == [1, 0] and len(part) == 2
    assert images.class_counts() == {"x": 2, "y": 1, "z": 0}


def test_linked_subset_reads_back_as_the_same_dataset(pets, tmp_path):
    linked = scan_folder(pets.link_to(tmp_path / "pets"))
    assert linked.class_names == pets.class_names and linked.labels.tolist() == pets.labels.tolist()
    assert [os.path.realpath(p) for p in linked.paths] == [os.path.realpath(p) for p in pets.paths]
