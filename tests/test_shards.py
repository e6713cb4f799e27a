"""Sharded extraction: shards as separate processes give the features and the run of one process.

The store-level tests use fake features; the end-to-end ones run `python -m transferkit extract --shard i/3`
as three processes at once on 24 real images (MobileNet alpha 0.25 at 64 px).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import copy_first_images
from test_features import CountingEmbed, fake_embed, labels_for, make_images

from transferkit.errors import TransferkitError
from transferkit.features.shards import ShardsMissing, compute_shard, link_shards, parse_shard, shard_path, shard_rows
from transferkit.features.store import FeatureStore


# --------------------------------------------------------------------------------------------
# Shards of a list, and the store
# --------------------------------------------------------------------------------------------

def test_shards_are_contiguous_cover_the_list_once_and_depend_on_n_i_and_n_only():
    for n in range(0, 30):
        for count in range(1, 8):
            ranges = [shard_rows(n, index, count) for index in range(1, count + 1)]
            assert [row for start, stop in ranges for row in range(start, stop)] == list(range(n))
            assert max(stop - start for start, stop in ranges) - min(stop - start for start, stop in ranges) <= 1
    assert shard_rows(10, 2, 3) == (3, 6) and shard_path("/c/m-0123456789ab.h5", 2, 3).name == \
        "m-0123456789ab.shard-2-of-3.h5"


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/3", "1/0", "-1/3", "1/3/3", ""])
def test_a_bad_shard_is_one_line(text):
    with pytest.raises(TransferkitError) as error:
        parse_shard(text)
    message = str(error.value)
    assert "\n" not in message and ("expected I/N" in message or "counted from 1" in message or "N must be" in message)


def test_shard_syntax_is_checked_before_the_recipe_is_read(in_process, tmp_path):
    from transferkit.strategies.extract import extract

    for bad in ("0/3", "4/3", "two/3"):
        code, out, err = in_process("extract", tmp_path / "no-such-recipe.yaml", "--shard", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--shard" in err and "no-such" not in err, err
    with pytest.raises(TransferkitError, match="counted from 1"):
        extract(str(tmp_path / "no-such-recipe.yaml"), shard=(0, 3))


def shard_all(store, paths, count, embed=fake_embed, key="k1", skip=()):
    for index in range(1, count + 1):
        if index not in skip:
            compute_shard(store, "train", paths, labels_for(paths), embed, key=key, shard=(index, count),
                          chunk_size=4, progress=False)


def test_linked_shards_read_as_the_split_computed_in_one_go(tmp_path):
    paths = make_images(tmp_path / "images", n=23)
    whole = FeatureStore(tmp_path / "one" / "s-0123456789ab.h5")
    whole.compute("train", paths, labels_for(paths), fake_embed, key="k1", chunk_size=4, progress=False)
    store = FeatureStore(tmp_path / "three" / "s-0123456789ab.h5")
    shard_all(store, paths, 3)
    assert not store.path.exists()  # shards never write the store
    assert link_shards(store, "train", len(paths), key="k1") and not link_shards(store, "train", len(paths), key="k1")
    with h5py.File(store.path, "r") as file:
        assert all(file["train"][name].is_virtual for name in ("features", "labels", "paths"))
    counting = CountingEmbed()
    features, labels = store.compute("train", paths, labels_for(paths), counting, key="k1", progress=False)
    expected = whole.load("train")
    assert counting.calls == 0 and np.array_equal(features, expected[0]) and np.array_equal(labels, expected[1])
    assert store.load("train")[2] == paths
    moved = tmp_path / "moved"  # the shard files are named relative to the store: the folder can move
    shutil.move(store.path.parent, moved)
    assert np.array_equal(FeatureStore(moved / store.path.name).load("train")[0], expected[0])


def test_missing_shards_are_named_and_a_lost_shard_file_is_never_read_as_zeros(tmp_path):
    paths = make_images(tmp_path / "images", n=20)
    store = FeatureStore(tmp_path / "features" / "s-0123456789ab.h5")
    shard_all(store, paths, 4, skip=(2, 4))
    with pytest.raises(ShardsMissing, match=r"shards 2, 4 are missing .*--shard 2/4` and .*--shard 4/4`"):
        link_shards(store, "train", len(paths), key="k1")
    assert not link_shards(store, "train", len(paths), key="other key")  # another configuration's shards
    shard_all(store, paths, 4, skip=(1, 3))
    assert link_shards(store, "train", len(paths), key="k1")
    shard_path(store.path, 3, 4).unlink()
    assert not store.info()["train"]["complete"]
    with pytest.raises(ShardsMissing, match="shard 3 is missing"):
        link_shards(store, "train", len(paths), key="k1")
    for index in (1, 2, 4):
        shard_path(store.path, index, 4).unlink()
    counting = CountingEmbed()  # no shard left: the store computes the split itself, in full
    features, _ = store.compute("train", paths, labels_for(paths), counting, key="k1", chunk_size=4, progress=False)
    assert counting.calls == 5 and np.array_equal(features, fake_embed(paths).astype(np.float32))


# --------------------------------------------------------------------------------------------
# End to end: three processes against one
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cats_dogs24(datasets, tmp_path_factory) -> Path:
    return copy_first_images(datasets / "cats_dogs", tmp_path_factory.mktemp("cats_dogs24"), 12)


def write_recipe(folder: Path, data: Path) -> Path:
    recipe = {"name": "cd24", "seed": 0, "data": {"train": str(data), "val": 0.25, "image_size": 64, "batch_size": 8},
              "backbone": {"name": "mobilenet", "alpha": 0.25, "weights": "imagenet"},
              "extract": {"classifier": {"name": "logistic_regression", "grid": {"C": [0.1, 1.0]}}},
              "output": str(folder / "run")}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def one_and_three(cats_dogs24, tmp_path_factory):
    """The same recipe extracted by one process, and by three shard processes at once then a fitting run."""
    from transferkit.strategies.extract import extract

    one, three = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("three")
    env = {**os.environ, "TRANSFERKIT_HOME": str(three / "home"), "CUDA_VISIBLE_DEVICES": ""}
    shards = [subprocess.Popen([sys.executable, "-m", "transferkit", "extract", str(write_recipe(three, cats_dogs24)),
                                "--shard", f"{index}/3", "--quiet"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for index in (1, 2, 3)]
    with pytest.MonkeyPatch.context() as patch:  # meanwhile, the reference: one process
        patch.setenv("TRANSFERKIT_HOME", str(one / "home"))
        extract(write_recipe(one, cats_dogs24), progress=False)
    results = [(process.wait(timeout=300), *process.communicate()) for process in shards]
    for code, out, err in results:
        assert code == 0 and "shard" in err and "done; run without --shard" in err, err
        assert "run folder" not in out and not (three / "run").exists()
    files_after_shards = sorted(path.name for path in (three / "home" / "features").iterdir())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERKIT_HOME", str(three / "home"))
        extract(three / "recipe.yaml", progress=False)
    return one, three, files_after_shards


def store_of(folder: Path) -> FeatureStore:
    return FeatureStore(next(path for path in (folder / "home" / "features").glob("*.h5") if ".shard-" not in path.name))


def test_three_shard_processes_give_the_features_and_the_run_of_one(one_and_three):
    one, three, files_after_shards = one_and_three
    assert len(files_after_shards) == 3 and all(".shard-" in name for name in files_after_shards)  # one file each
    reference, sharded = store_of(one), store_of(three)
    assert reference.path.name == sharded.path.name and list(sharded.info()) == list(reference.info())
    for split in reference.info():
        with h5py.File(sharded.path, "r") as file:
            assert file[split]["features"].is_virtual
        expected, got = reference.load(split), sharded.load(split)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    for name in ("val_metrics.json", "val_predictions.csv", "model/calibration.json"):
        assert (one / "run" / name).read_text() == (three / "run" / name).read_text(), name
    with np.load(one / "run" / "model" / "classifier.npz") as a, np.load(three / "run" / "model" / "classifier.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[name], b[name]) for name in a.files)
    assert json.loads((three / "run" / "run.json").read_text())["info"]["images"] == {"train": 18, "val": 6}


def test_a_rerun_of_the_sharded_recipe_computes_nothing(one_and_three, monkeypatch, tmp_path):
    from transferkit.strategies import extract as strategy

    _, three, _ = one_and_three
    monkeypatch.setenv("TRANSFERKIT_HOME", str(three / "home"))
    monkeypatch.setattr(strategy._Embedder, "load", lambda self, paths: pytest.fail("features computed again"))
    recipe = strategy.load_recipe(three / "recipe.yaml", overrides=[f"output={tmp_path / 'again'}"])
    again = strategy.extract(recipe, progress=False)
    assert again.metrics["val"] == json.loads((three / "run" / "val_metrics.json").read_text())


def test_missing_shards_stop_the_fitting_run_at_once_naming_them(one_and_three, in_process, monkeypatch, tmp_path):
    from transferkit.strategies import extract as strategy

    _, three, _ = one_and_three
    shutil.copytree(three / "home" / "features", tmp_path / "home" / "features")
    next((tmp_path / "home" / "features").glob("*.shard-2-of-3.h5")).unlink()
    monkeypatch.setenv("TRANSFERKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(strategy, "feature_extractor", lambda *args: pytest.fail("the backbone was built"))
    recipe = three / "recipe.yaml"
    code, out, err = in_process("extract", recipe, "--set", f"output={tmp_path / 'run'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "shard 2 is missing" in err and f"`transferkit extract {recipe} --shard 2/3`" in err
