"""The extract strategy end to end on real images and real ImageNet weights (MobileNet alpha 0.25)."""

import json
import os

import numpy as np
import pytest

from transferkit.features import FeatureStore
from transferkit.recipe import load_recipe
from transferkit.run import Run
from transferkit.strategies.extract import extract


@pytest.fixture(scope="module")
def small_cats_dogs(datasets, tmp_path_factory):
    """20 cats and 20 dogs (symlinks to the real files)."""
    root = tmp_path_factory.mktemp("cats_dogs20")
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for path in sorted((datasets / "cats_dogs" / cls).iterdir())[:20]:
            os.symlink(path, root / cls / path.name)
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERKIT_HOME", str(path))
        yield path


def make_recipe(data, output, **extract):
    return load_recipe({"name": "cd", "seed": 0,
                        "data": {"train": str(data), "val": 0.25, "image_size": 128, "batch_size": 16},
                        "backbone": {"name": "mobilenet", "alpha": 0.25, "weights": "imagenet"},
                        "extract": {"classifier": {"name": "logistic_regression", "grid": {"C": [0.1, 1.0]}},
                                    **extract},
                        "output": str(output)})


@pytest.fixture(scope="module")
def first_run(small_cats_dogs, home, tmp_path_factory):
    return extract(make_recipe(small_cats_dogs, tmp_path_factory.mktemp("run")), progress=False)


def test_extract_trains_and_writes_the_run_folder(first_run):
    folder = first_run.folder
    assert first_run.metrics["val"]["n"] == 10 and first_run.class_names == ["cat", "dog"]
    assert first_run.metrics["val"]["top1"] >= 0.7  # ImageNet features separate cats from dogs
    for name in ["run.json", "recipe.yaml", "model/feature_extractor.keras", "model/classifier.joblib",
                 "val_metrics.json", "val_confusion_matrix.png", "val_predictions.csv", "val_mistakes.csv"]:
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "run.json").read_text())
    assert summary["image_size"] == 128 and summary["info"]["feature_dim"] == 256


def test_saved_run_predicts_like_the_trained_one(first_run, small_cats_dogs):
    paths = sorted(str(p) for p in (small_cats_dogs / "dog").iterdir())[:4]
    loaded = Run.load(first_run.folder)
    assert loaded.class_names == first_run.class_names
    np.testing.assert_allclose(loaded.predict(paths), first_run.predict(paths), atol=1e-5)


def test_second_run_reuses_the_cached_features(first_run, small_cats_dogs, home, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(FeatureStore, "compute", _counting(FeatureStore.compute, calls))
    again = extract(make_recipe(small_cats_dogs, tmp_path / "again"), progress=False)
    assert calls and all(embedded == 0 for embedded in calls)
    assert again.metrics["val"]["top1"] == first_run.metrics["val"]["top1"]


def test_layer_list_concatenates_pooled_features(small_cats_dogs, home, tmp_path):
    run = extract(make_recipe(small_cats_dogs, tmp_path / "two", layer=["conv_pw_5_relu", "top"]), progress=False)
    assert run.info["feature_dim"] == 64 + 256


def _counting(compute, calls):
    """Wrap FeatureStore.compute to record how many images each call had to embed."""
    def wrapped(self, split, paths, labels, embed, **kwargs):
        count = [0]

        def counted(chunk):
            count[0] += len(chunk)
            return embed(chunk)
        try:
            return compute(self, split, paths, labels, counted, **kwargs)
        finally:
            calls.append(count[0])
    return wrapped
