"""The extract strategy end to end on real images and real ImageNet weights (MobileNet alpha 0.25)."""

import json
import os

import numpy as np
import pytest

from transferkit.features.store import FeatureStore
from transferkit.recipe import load_recipe
from transferkit.run import Run
from transferkit.strategies.extract import extract

pytestmark = [pytest.mark.slow, pytest.mark.backends]


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
    for name in ["run.json", "recipe.yaml", "model/feature_extractor.keras",
                 "val_metrics.json", "val_confusion_matrix.png", "val_predictions.csv", "val_mistakes.csv"]:
        assert (folder / name).is_file(), name
    assert list((folder / "model").glob("classifier.*"))
    assert not folder.with_name(f"{folder.name}.partial").exists()  # written beside it, then moved in
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


def test_predict_command_skips_and_names_a_corrupt_file(first_run, small_cats_dogs, tmp_path):
    from test_cli import transferkit

    folder = tmp_path / "new"
    folder.mkdir()
    good = sorted((small_cats_dogs / "cat").iterdir())[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:300])
    result = transferkit("predict", first_run.folder, folder, "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(os.path.basename(r["path"]) for r in rows) == sorted(p.name for p in good)
    assert all(r["class"] in ("cat", "dog") and len(r["top"]) == 2 for r in rows)
    assert "broken.jpg" in result.stderr and result.stderr.count("warning:") == 1


def test_predict_matches_the_saved_run(first_run, small_cats_dogs):
    loaded = Run.load(first_run.folder)
    rows, skipped = loaded.classify([small_cats_dogs / "dog"], top_k=1)
    assert len(rows) == 20 and not skipped
    expected = first_run.predict([r["path"] for r in rows]).max(axis=1)
    np.testing.assert_allclose([r["probability"] for r in rows], expected, atol=1e-5)


def test_evaluate_command_on_other_data(first_run, small_cats_dogs):
    from test_cli import transferkit

    result = transferkit("evaluate", first_run.folder, "--data", small_cats_dogs)
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout
    metrics = json.loads((first_run.folder / "evaluations" / small_cats_dogs.name / "eval_metrics.json").read_text())
    assert metrics["n"] == 40


def test_evaluate_again_on_the_runs_own_split_gives_the_same_metrics(first_run):
    again = Run.load(first_run.folder).evaluate()
    assert again["top1"] == first_run.metrics["val"]["top1"] and again["n"] == first_run.metrics["val"]["n"]


def test_evaluate_and_export_wait_for_no_run_but_refuse_a_folder_in_use(first_run, tmp_path):
    from transferkit.errors import ResourceError
    from transferkit.export import export_model
    from transferkit.outputs import folder_lock

    loaded = Run.load(first_run.folder)
    before = (first_run.folder / "val_metrics.json").read_bytes()
    with folder_lock(first_run.folder):  # as a run replacing the folder holds it
        with pytest.raises(ResourceError, match="in use by another transferkit run"):
            loaded.evaluate()
        with pytest.raises(ResourceError, match="in use by another transferkit run"):
            export_model(loaded)
        export_model(loaded, tmp_path / "elsewhere.keras")  # outside the run folder: no lock needed
    assert (first_run.folder / "val_metrics.json").read_bytes() == before


def test_tta_is_part_of_the_saved_model_so_predict_matches_training(small_cats_dogs, home, tmp_path):
    run = extract(make_recipe(small_cats_dogs, tmp_path / "tta", tta=True), progress=False)
    val = [row.split(",")[0] for row in (run.folder / "val_predictions.csv").read_text().splitlines()[1:]]
    saved = np.array([float(row.split(",")[3]) for row in (run.folder / "val_predictions.csv").read_text().splitlines()[1:]])
    np.testing.assert_allclose(Run.load(run.folder).predict(val).max(axis=1), saved, atol=1e-4)
    image = np.random.default_rng(0).uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    features = run.predictor.feature_extractor
    np.testing.assert_allclose(features.predict(image, verbose=0), features.predict(image[:, :, ::-1], verbose=0),
                               atol=1e-4)


def test_export_command_writes_a_model_that_agrees_with_the_run(first_run, small_cats_dogs):
    from test_cli import transferkit

    from transferkit.export import load_exported_model

    result = transferkit("export", first_run.folder)
    assert result.returncode == 0, result.stderr
    model, class_names = load_exported_model(first_run.folder / "model" / "model.keras")
    paths = sorted(str(p) for p in (small_cats_dogs / "cat").iterdir())[:6]
    from transferkit.data.decode import load_images
    exported = model.predict(load_images(paths, 128).astype("float32"), verbose=0)
    assert class_names == ["cat", "dog"]
    np.testing.assert_allclose(exported, first_run.predict(paths), atol=1e-4)


def test_out_of_memory_names_a_smaller_batch(small_cats_dogs, home, tmp_path, monkeypatch):
    import keras

    from transferkit.errors import DeviceMemoryError

    recipe = make_recipe(small_cats_dogs, tmp_path / "run")
    recipe.data.image_size = 96  # features not in the store yet

    def exhausted(self, x):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")
    monkeypatch.setattr(keras.Model, "predict_on_batch", exhausted)
    with pytest.raises(DeviceMemoryError, match=r"^out of memory extracting features at data.batch_size 16 "
                                                r"\(96 px\): lower it, e.g. --set data.batch_size=8; the "
                                                r"features extracted so far are kept$"):
        extract(recipe, progress=False)
    monkeypatch.setattr(keras.Model, "predict_on_batch", lambda self, x: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):  # anything else is not dressed up
        extract(recipe, progress=False)
    monkeypatch.undo()
    assert extract(recipe, progress=False).metrics["val"]["n"] == 10  # and the same command then runs


def test_run_json_lists_each_skipped_file_once(small_cats_dogs, home, tmp_path):
    data = tmp_path / "data"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for path in sorted((small_cats_dogs / cls).iterdir())[:6]:
            (data / cls / path.name).write_bytes(path.read_bytes())
    (data / "cat" / "broken.jpg").write_bytes(b"not an image")
    recipe = make_recipe(data, tmp_path / "run")
    recipe.data.image_size, recipe.data.test = 32, 0.25  # train, val and test all come from the folder
    with pytest.warns(UserWarning, match="broken.jpg"):
        run = extract(recipe, progress=False)
    skipped = json.loads((run.folder / "run.json").read_text())["info"]["skipped_files"]
    assert [os.path.basename(path) for path, _ in skipped] == ["broken.jpg"]
