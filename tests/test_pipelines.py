"""transferkit.data.pipelines: tf.data and PyDataset batches from real images, shuffling, augmentation, caching."""

import functools
import time

import numpy as np
import pytest

from transferkit.data import decode as data, pipelines
from transferkit.data.decode import load_images
from transferkit.data.folders import scan_folder
from transferkit.data.pipelines import make_dataset


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
    from transferkit.data.augment import build_augmentation

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

    from transferkit.data.augment import build_augmentation

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
    from transferkit.data.augment import BatchMixer

    ((x, y),) = _batches(make_dataset(pets, 32, 20, num_classes=2, pipeline=pipeline))
    assert y.dtype == np.float32 and np.array_equal(y.argmax(axis=1), pets.labels) and np.all(y.sum(axis=1) == 1)
    ((mx, my),) = _batches(make_dataset(pets, 32, 20, num_classes=2, pipeline=pipeline,
                                        mix=functools.partial(BatchMixer, mixup=0.4)))
    assert mx.shape == x.shape and not np.array_equal(mx, x)
    np.testing.assert_allclose(my.sum(axis=1), 1, atol=1e-6)
    assert np.any((my > 0) & (my < 1))  # soft targets
    with pytest.raises(ValueError, match="mix needs one-hot labels"):
        make_dataset(pets, 32, mix=functools.partial(BatchMixer, mixup=0.4), pipeline=pipeline)


def _count_decodes(monkeypatch) -> list:
    """The paths decoded from now on, in order."""
    calls = []
    load_image = data.load_image
    counting = lambda path, size: calls.append(path) or load_image(path, size)  # noqa: E731
    monkeypatch.setattr(data, "load_image", counting)  # the PyDataset pipeline, through data.load_images
    monkeypatch.setattr(pipelines, "load_image", counting)  # the tf.data pipeline
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


def test_pydataset_decodes_the_next_batches_ahead(pets, monkeypatch):
    calls = _count_decodes(monkeypatch)
    dataset = make_dataset(pets, 32, 4, pipeline="pydataset")
    x, _ = dataset[0]
    ahead = 4 * (1 + pipelines.PREFETCH)
    deadline = time.monotonic() + 30
    while len(calls) < ahead and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(calls) == sorted(pets.paths[:ahead])
    x1, _ = dataset[1]  # served from the prefetched decode, not decoded again
    assert all(calls.count(path) == 1 for path in pets.paths[4:8])
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
    from transferkit.data.pipelines import cache_limit

    assert cache_limit("auto", 1000, 224) == 1000
    assert 0 < cache_limit("auto", 10**9, 224) < 10**9  # a bound: as many as fit, not all or nothing
    assert cache_limit(True, 10**9, 224) == 10**9 and cache_limit(False, 1, 8) == 0
    assert cache_limit(7, 20, 32) == 7 and cache_limit(50, 20, 32) == 20


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_training_epochs_depend_on_the_seed_and_the_epoch_alone(pets, pipeline):
    """What a resumed run relies on: epochs 1-2 of a dataset that starts at epoch 1 are those of one
    that starts at epoch 0, order, augmentation and mixing draws included."""
    from transferkit.data.augment import BatchMixer, build_augmentation

    def epochs(first, seed=7):
        augment = build_augmentation(["random_flip", {"random_rotation": 0.2}], seed=seed)
        dataset = make_dataset(pets, 32, 8, epochs=range(first, 3), augment=augment, seed=seed, num_classes=2,
                               mix=functools.partial(BatchMixer, mixup=0.4, cutmix=1.0), pipeline=pipeline)
        batches = _batches(dataset)
        return [batches[i:i + 3] for i in range(0, len(batches), 3)]  # 3 batches per epoch

    from_start, resumed = epochs(0), epochs(1)
    assert len(from_start) == 3 and len(resumed) == 2
    for epoch, again in zip(from_start[1:], resumed):
        for (x, y), (rx, ry) in zip(epoch, again):
            assert np.array_equal(x, rx) and np.array_equal(y, ry)
    first, second = ([float(y.argmax(1).sum()) for _, y in epoch] + [float(x.sum()) for x, _ in epoch]
                     for epoch in from_start[:2])
    assert first != second  # a new order and new draws every epoch
    assert not np.array_equal(epochs(1, seed=8)[0][0][0], resumed[0][0][0])


def test_an_epoch_order_is_the_same_in_both_pipelines(pets):
    orders = [[tuple(y.tolist()) for _, y in _batches(make_dataset(pets, 32, 8, epochs=range(2, 4), pipeline=p))]
              for p in ("tf", "pydataset")]
    assert orders[0] == orders[1]


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_a_batch_larger_than_the_images_holds_them_all(pets, pipeline):
    (x, y), = _batches(make_dataset(pets, 8, 10**9, pipeline=pipeline))
    assert len(x) == len(y) == len(pets)
    assert [len(y) for _, y in _batches(make_dataset(pets, 8, 10**9, epochs=range(2), pipeline=pipeline))] == [20, 20]
