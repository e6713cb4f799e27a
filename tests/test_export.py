"""export_model on real extract runs (MobileNet alpha 0.25): the exported Keras model predicts like the run."""

import json
import shutil

import numpy as np
import pytest

from transferkit.data.decode import load_images
from transferkit.errors import TransferkitError
from transferkit.export import export_model, load_exported_model
from transferkit.recipe import load_recipe
from transferkit.strategies.extract import extract

pytestmark = pytest.mark.slow  # every test extracts features of real images
CASES = {  # run name -> (dataset, classes, classifier spec)
    "logreg_binary": ("cats_dogs", ("cat", "dog"), {"name": "logistic_regression", "grid": {"C": [0.1, 1.0]}}),
    "logreg_3_classes": ("dtd10", ("banded", "bubbly", "cracked"), {"name": "logistic_regression"}),
    "svm_binary": ("cats_dogs", ("cat", "dog"), {"name": "linear_svm", "grid": {}}),
    "svm_3_classes": ("dtd10", ("banded", "bubbly", "cracked"), {"name": "linear_svm", "grid": {}}),
    "unstandardized": ("cats_dogs", ("cat", "dog"), {"name": "logistic_regression", "grid": {}, "standardize": False}),
    "knn": ("cats_dogs", ("cat", "dog"), {"name": "knn", "grid": {}}),
}
TRAIN, HELD_OUT = 12, 4  # images per class


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def folders(datasets, tmp_path_factory):
    """dataset -> (training folder of TRAIN copied images per class, held-out image paths)."""
    made = {}
    for dataset, classes, _ in CASES.values():
        if dataset in made:
            continue
        data, held_out = tmp_path_factory.mktemp(dataset), []
        for cls in classes:
            files = sorted((datasets / dataset / cls).iterdir())
            (data / cls).mkdir()
            for path in files[:TRAIN]:
                shutil.copy(path, data / cls / path.name)
            held_out += [str(path) for path in files[TRAIN:TRAIN + HELD_OUT]]
        made[dataset] = data, held_out
    return made


@pytest.fixture(scope="module")
def runs(folders, home, tmp_path_factory):
    """name -> (extract run, held-out image paths), trained on first use."""
    made = {}

    def get(name):
        if name not in made:
            dataset, _, classifier = CASES[name]
            data, held_out = folders[dataset]
            recipe = load_recipe({"name": name, "seed": 0,
                                  "data": {"train": str(data), "val": 0.25, "image_size": 96, "batch_size": 16},
                                  "backbone": {"name": "mobilenet", "alpha": 0.25, "weights": "imagenet"},
                                  "extract": {"classifier": classifier},
                                  "output": str(tmp_path_factory.mktemp("runs") / name)})
            made[name] = extract(recipe, progress=False), held_out
        return made[name]
    return get


@pytest.mark.parametrize("name", [name for name in CASES if name != "knn"])
def test_exported_model_predicts_like_the_run(runs, name):
    run, held_out = runs(name)
    assert sorted(p.name for p in (run.folder / "model").iterdir()) == [
        "calibration.json", "classifier.npz", "feature_extractor.keras"]
    path = export_model(run.folder if name == "svm_binary" else run)  # a run or its folder
    assert path == run.folder / "model" / "model.keras" and path.is_file()
    model, class_names = load_exported_model(path)
    assert class_names == run.class_names == list(CASES[name][1])
    assert model.get_layer("classifier").units == len(class_names)
    exported = model.predict(load_images(held_out, 96).astype("float32"), verbose=0)
    expected = run.predict(held_out)
    np.testing.assert_array_equal(exported.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(exported, expected, atol=1e-4)


def test_the_exported_model_gives_the_calibrated_probabilities(runs, tmp_path):
    from transferkit.reports.calibration import apply_temperature
    from transferkit.run import Run

    run, held_out = runs("logreg_3_classes")
    assert run.metrics["val"]["ece"] >= 0 and (run.folder / "val_reliability.png").is_file()
    raw = run.predictor.with_temperature(1.0).predict(load_images(held_out, 96).astype("float32"), 16)
    hot = Run(run.recipe, run.class_names, run.image_size, run.predictor.with_temperature(2.5))
    hot.save(tmp_path / "hot")
    assert json.loads((tmp_path / "hot" / "model" / "calibration.json").read_text()) == {"temperature": 2.5}
    model, _ = load_exported_model(export_model(tmp_path / "hot"))
    exported = model.predict(load_images(held_out, 96).astype("float32"), verbose=0)
    np.testing.assert_allclose(exported, apply_temperature(raw, 2.5), atol=1e-4)
    np.testing.assert_allclose(Run.load(tmp_path / "hot").predict(held_out), exported, atol=1e-4)
    assert np.abs(exported - raw).max() > 0.01  # the temperature made a difference worth checking


def test_plain_keras_loads_it_and_the_classes_sit_beside_it(runs, tmp_path):
    import keras

    import transferkit.models.layers  # noqa: F401  (registers Preprocess)

    run, _ = runs("logreg_binary")
    path = export_model(run, tmp_path / "cats.keras")
    assert keras.saving.load_model(path).output.shape == (None, 2)
    assert json.loads((tmp_path / "cats.classes.json").read_text()) == {"class_names": ["cat", "dog"],
                                                                        "image_size": 96}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cats.classes.json", "cats.keras"]  # no temp files left


def test_non_linear_classifier_is_refused_in_one_line(runs):
    run, _ = runs("knn")
    message = ("export needs a linear classifier (logistic_regression or linear_svm); this run uses knn: "
               "use `transferkit predict` instead")
    assert (run.folder / "model" / "classifier.skops").is_file()
    for source in (run, run.folder):  # the run, or its folder (the classifier loaded from skops)
        with pytest.raises(TransferkitError) as error:
            export_model(source)
        assert str(error.value) == message
    assert not (run.folder / "model" / "model.keras").exists()
