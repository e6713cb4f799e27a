"""Classifiers saved without pickle, and run folders and caches that never run code when opened.

The crafted files below would run code (create a marker file) if they were unpickled or loaded
with their types trusted; each test first shows that, then that transferkit refuses them in one line.
"""

import dataclasses
import io
import json
import pickle
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io
import yaml

from test_cli import assert_one_line_error, transferkit
from transferkit.features.classifiers import build_classifier, cv_scores, fit_cached, predict_proba
from transferkit.data.decode import load_images
from transferkit.errors import TransferkitError
from transferkit.features.persistence import load_classifier, save_classifier, saved_classifier
from transferkit.recipe import ClassifierSpec, load_recipe
from transferkit.run import FeaturePredictor, Run

SIZE = 32  # pixels: the tiny extractor below pools colour, so small images will do


class MarkerOnLoad:
    """Creates its marker file when unpickled or rebuilt from its state: stands for any payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)

    def __setstate__(self, state):
        Path(state["marker"]).touch()


@pytest.fixture(scope="module")
def images(datasets):
    """30 cats and 30 dogs and 30 of a third class (dtd10 textures), decoded at SIZE px."""
    picks = [(datasets / "cats_dogs" / "cat", 0), (datasets / "cats_dogs" / "dog", 1),
             (datasets / "dtd10" / "banded", 2)]
    paths, labels = [], []
    for folder, label in picks:
        chosen = sorted(folder.iterdir())[:30]
        paths += [str(p) for p in chosen]
        labels += [label] * len(chosen)
    return paths, load_images(paths, SIZE).astype("float32"), np.array(labels)


@pytest.fixture(scope="module")
def features(images):
    """Per image: mean, std, min and max of each colour channel, a 12-value feature vector of the real image."""
    _, pixels, labels = images
    return np.concatenate([f(pixels, axis=(1, 2)) for f in (np.mean, np.std, np.min, np.max)], axis=1), labels


def fitted(spec, features, classes):
    x, y = features
    keep = y < classes
    return build_classifier(**dataclasses.asdict(spec), seed=0, n_samples_per_class=30).fit(x[keep], y[keep]), x[keep]


LINEAR = {"logistic_regression": ClassifierSpec("logistic_regression", grid={"C": [0.1, 1.0]}),
          "linear_svm": ClassifierSpec("linear_svm"),
          "linear_svm unstandardized": ClassifierSpec("linear_svm", grid={}, standardize=False),
          "logistic_regression class weights": ClassifierSpec("logistic_regression", grid={},
                                                              class_weight={0: 1.0, 1: 3.0, 2: 1.0})}


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_classifiers_are_arrays_and_predict_exactly_as_before(name, classes, features, tmp_path):
    spec = LINEAR[name]
    if spec.class_weight and classes == 2:
        spec = ClassifierSpec("logistic_regression", grid={}, class_weight={0: 1.0, 1: 3.0})
    model, x = fitted(spec, features, classes)
    path = save_classifier(model, tmp_path / "classifier")
    assert path.name == "classifier.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["classifier.npz"]
    with np.load(path, allow_pickle=False) as file:  # plain arrays, readable without pickle
        assert all(file[name].dtype != object for name in file.files)
    loaded, search = load_classifier(path)
    best = getattr(model, "best_estimator_", model)
    assert type(loaded) is type(best) and loaded.get_params(deep=True).keys() == best.get_params(deep=True).keys()
    assert loaded.named_steps["classifier"].get_params() == best.named_steps["classifier"].get_params()
    np.testing.assert_array_equal(predict_proba(loaded, x), predict_proba(model, x))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert search == ({"best_params": model.best_params_, "best_score": model.best_score_, "cv": cv_scores(model)}
                      if spec.grid != {} else {})


@pytest.mark.parametrize("name", ["knn", "random_forest"])
def test_other_classifiers_go_through_skops_with_trusted_types(name, features, tmp_path):
    model, x = fitted(ClassifierSpec(name, params={"n_estimators": 10} if name == "random_forest" else {}),
                      features, 3)
    path = save_classifier(model, tmp_path / "classifier")
    assert path.name == "classifier.skops"
    loaded, search = load_classifier(path)
    np.testing.assert_array_equal(predict_proba(loaded, x), predict_proba(model, x))
    assert search["best_params"] == model.best_params_


def test_a_classifier_outside_the_trusted_list_needs_trust_by_name(features, tmp_path):
    model, x = fitted(ClassifierSpec("sklearn.svm:SVC", grid={}), features, 2)
    path = save_classifier(model, tmp_path / "classifier")
    with pytest.raises(TransferkitError) as error:
        load_classifier(path)
    message = str(error.value)
    assert "\n" not in message and "sklearn.svm._classes.SVC" in message and "trusted=" in message
    loaded, _ = load_classifier(path, trusted=["sklearn.svm._classes.SVC"])
    np.testing.assert_array_equal(predict_proba(loaded, x), predict_proba(model, x))


def test_a_new_save_replaces_the_other_format(features, tmp_path):
    (tmp_path / "classifier.joblib").write_bytes(b"old pickle")
    save_classifier(fitted(ClassifierSpec("knn", grid={}), features, 2)[0], tmp_path / "classifier")
    save_classifier(fitted(ClassifierSpec("linear_svm", grid={}), features, 2)[0], tmp_path / "classifier")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.npz"]
    assert saved_classifier(tmp_path / "classifier") == tmp_path / "classifier.npz"


# --------------------------------------------------------------------------------------------
# Crafted files
# --------------------------------------------------------------------------------------------

def pickled_payload(marker) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(MarkerOnLoad(marker), buffer)
    return buffer.getvalue()


def npz_with_object_array(marker) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, metadata=np.array(json.dumps({"format": "transferkit.classifier", "version": 1})),
             **{"0.coef_": np.array([MarkerOnLoad(marker)], dtype=object)})
    return buffer.getvalue()


def skops_with_untrusted_type(marker) -> bytes:
    return skops.io.dumps({"estimator": MarkerOnLoad(marker), "metadata": "{}"})


def skops_naming_a_function(marker) -> bytes:
    """A valid skops file whose schema is edited to name os.system."""
    data = skops.io.dumps({"estimator": "x", "metadata": "{}"})
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    schema = json.loads(members["schema.json"])
    schema["content"]["estimator"] = {"__class__": "system", "__module__": "os",
                                                 "__loader__": "FunctionNode"}
    members["schema.json"] = json.dumps(schema).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_the_payloads_do_run_code_when_opened_naively(tmp_path):
    """So that the refusals below mean something."""
    marker = tmp_path / "marker"
    joblib.load(io.BytesIO(pickled_payload(marker)))
    assert marker.exists()
    marker.unlink()
    np.load(io.BytesIO(npz_with_object_array(marker)), allow_pickle=True)["0.coef_"]
    assert marker.exists()
    marker.unlink()
    skops.io.loads(skops_with_untrusted_type(marker), trusted=[f"{__name__}.MarkerOnLoad"])
    assert marker.exists()


@pytest.mark.parametrize("craft, suffix, said", [
    (npz_with_object_array, ".npz", "Object arrays cannot be loaded"),
    (skops_with_untrusted_type, ".skops", "test_persistence.MarkerOnLoad"),
    (skops_naming_a_function, ".skops", "skops FunctionNode"),
    (lambda marker: b"not a zip", ".npz", "cannot read this classifier"),
])
def test_crafted_classifier_files_are_refused_in_one_line(craft, suffix, said, tmp_path):
    marker, path = tmp_path / "marker", tmp_path / f"classifier{suffix}"
    path.write_bytes(craft(marker))
    with pytest.raises(TransferkitError) as error:
        load_classifier(path)
    assert said in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def forest_with_a_node_pointing_outside(features):
    model, _ = fitted(ClassifierSpec("random_forest", params={"n_estimators": 3}, grid={}), features, 2)
    tree = model.named_steps["classifier"].estimators_[1].tree_
    state = tree.__getstate__()
    state["nodes"] = state["nodes"].copy()
    state["nodes"]["left_child"][0] = 10 ** 9
    tree.__setstate__(state)
    return model


def neighbours_with_an_index_outside(features):
    model, _ = fitted(ClassifierSpec("knn", params={"algorithm": "kd_tree"}, grid={}), features, 2)
    index = model.named_steps["classifier"]._tree
    state = list(index.__getstate__())
    state[1] = state[1].copy()
    state[1][3] = 10 ** 9
    index.__setstate__(tuple(state))
    return model


@pytest.mark.parametrize("craft, said", [(forest_with_a_node_pointing_outside, "a decision tree's nodes point"),
                                         (neighbours_with_an_index_outside, "a neighbour tree's index points")])
def test_trees_whose_indexes_point_outside_are_refused_before_predicting(craft, said, features, tmp_path):
    """Compiled code follows a tree's indexes unchecked: a crafted one would crash the process."""
    path = save_classifier(craft(features), tmp_path / "classifier")
    with pytest.raises(TransferkitError, match=said):
        load_classifier(path)


@pytest.fixture
def run_folder(images, features, tmp_path):
    """A saved extract run: a small Keras extractor (colour statistics of real images) and a linear classifier."""
    import keras

    paths, pixels, labels = images
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = [keras.layers.GlobalAveragePooling2D()(inputs), keras.layers.GlobalMaxPooling2D()(inputs)]
    extractor = keras.Model(inputs, keras.layers.Concatenate()(pooled), name="colours")
    x = extractor.predict(pixels, verbose=0)
    classifier = build_classifier(grid={"C": [0.1, 1.0]}, seed=0, n_samples_per_class=30).fit(x, labels)
    recipe = load_recipe({"name": "colours", "data": {"train": str(Path(paths[0]).parents[1]), "image_size": SIZE},
                          "strategy": "extract", "output": str(tmp_path / "run")})
    run = Run(recipe=recipe, class_names=["cat", "dog", "banded"], image_size=SIZE,
              predictor=FeaturePredictor(extractor, classifier))
    run.save()
    return run


def test_run_folder_round_trip_predicts_the_same(run_folder, images):
    paths, pixels, _ = images
    assert (run_folder.folder / "model" / "classifier.npz").is_file()
    assert not list(run_folder.folder.rglob("*.joblib")) and not list(run_folder.folder.rglob("*.pkl"))
    loaded = Run.load(run_folder.folder)
    np.testing.assert_array_equal(loaded.predict(pixels), run_folder.predict(pixels))
    assert loaded.class_names == ["cat", "dog", "banded"]


@pytest.mark.parametrize("craft, name, said", [
    (pickled_payload, "classifier.joblib", "re-run `transferkit extract`"),
    (npz_with_object_array, "classifier.npz", "Object arrays cannot be loaded"),
    (skops_with_untrusted_type, "classifier.skops", "test_persistence.MarkerOnLoad"),
])
def test_crafted_run_folder_never_runs_code(craft, name, said, run_folder, tmp_path):
    model = run_folder.folder / "model"
    (model / "classifier.npz").unlink()
    marker = tmp_path / "marker"
    (model / name).write_bytes(craft(marker))
    with pytest.raises(TransferkitError) as error:
        Run.load(run_folder.folder)
    assert said in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_a_keras_model_with_a_lambda_layer_is_refused_by_safe_mode(run_folder, tmp_path):
    import keras

    marker = tmp_path / "marker"
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")  # noqa: S307
    inputs = keras.Input((SIZE, SIZE, 3))
    crafted = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(payload)(inputs)))
    crafted.save(run_folder.folder / "model" / "feature_extractor.keras")
    marker.unlink()  # building the model ran it once, here
    with pytest.raises(TransferkitError) as error:
        Run.load(run_folder.folder)
    assert "feature_extractor.keras: cannot be loaded safely" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()
    keras.saving.load_model(run_folder.folder / "model" / "feature_extractor.keras", safe_mode=False)
    assert marker.exists()  # the payload is real


def test_old_run_folder_is_told_to_rerun_extract(run_folder, tmp_path):
    model = run_folder.folder / "model"
    (model / "classifier.npz").unlink()
    (model / "classifier.joblib").write_bytes(pickled_payload(tmp_path / "marker"))
    with pytest.raises(TransferkitError, match=r"holds a pickle \(model/classifier.joblib\), which is never opened "
                                               r"because it could run code: re-run `transferkit extract`"):
        Run.load(run_folder.folder)
    assert not (tmp_path / "marker").exists()


def test_cli_and_export_on_a_crafted_run_folder_are_one_line_and_run_nothing(run_folder, images, tmp_path):
    from transferkit.export import export_model

    model = run_folder.folder / "model"
    (model / "classifier.npz").unlink()
    marker = tmp_path / "marker"
    (model / "classifier.joblib").write_bytes(pickled_payload(marker))
    assert_one_line_error(transferkit("predict", run_folder.folder, images[0][0]), "re-run `transferkit extract`")
    with pytest.raises(TransferkitError, match="re-run `transferkit extract`"):
        export_model(run_folder.folder)
    assert not marker.exists()


def test_load_predict_and_export_import_nothing_the_recipe_names(run_folder, images, tmp_path, monkeypatch):
    """recipe.yaml is data: its import paths are never imported from a run folder."""
    from transferkit.export import export_model

    marker = tmp_path / "marker"
    (tmp_path / "tk_marker_module.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = yaml.safe_load((run_folder.folder / "recipe.yaml").read_text())
    recipe["head"]["custom"] = "tk_marker_module:head"
    recipe["extract"]["classifier"]["name"] = "tk_marker_module:Classifier"
    (run_folder.folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    loaded = Run.load(run_folder.folder)
    loaded.predict(images[1][:4])
    export_model(loaded, tmp_path / "exported.keras")
    assert not marker.exists()
    __import__("tk_marker_module")  # what importing it would have done
    assert marker.exists()


def test_run_of_an_untrusted_classifier_type_loads_only_when_trusted_by_name(run_folder, images, features):
    from sklearn.svm import SVC

    _, pixels, labels = images
    x = run_folder.predictor.feature_extractor.predict(pixels, verbose=0)
    run_folder.predictor.classifier = build_classifier("sklearn.svm:SVC", grid={}, seed=0).fit(x, labels)
    run_folder.save()
    assert sorted(p.name for p in (run_folder.folder / "model").iterdir()) == [
        "calibration.json", "classifier.skops", "feature_extractor.keras"]
    with pytest.raises(TransferkitError, match="sklearn.svm._classes.SVC"):
        Run.load(run_folder.folder)
    loaded = Run.load(run_folder.folder, trusted=["sklearn.svm._classes.SVC"])
    assert isinstance(loaded.predictor.classifier.named_steps["classifier"], SVC)
    np.testing.assert_array_equal(loaded.predict(pixels), run_folder.predict(pixels))



def test_the_commands_open_an_untrusted_classifier_type_only_with_trust(run_folder, images, features, in_process):
    _, pixels, labels = images
    x = run_folder.predictor.feature_extractor.predict(pixels, verbose=0)
    run_folder.predictor.classifier = build_classifier("sklearn.svm:SVC", grid={}, seed=0).fit(x, labels)
    run_folder.save()
    code, _, err = in_process("predict", run_folder.folder, images[0][0])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--trust sklearn.svm._classes.SVC" in err
    code, out, err = in_process("predict", run_folder.folder, images[0][0], "--trust", "sklearn.svm._classes.SVC")
    assert code == 0 and out.startswith(str(images[0][0])), err


# --------------------------------------------------------------------------------------------
# The classifier cache
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("craft, suffix", [(pickled_payload, ".joblib"), (npz_with_object_array, ".npz"),
                                           (skops_with_untrusted_type, ".skops")])
def test_crafted_or_old_cache_entries_are_refitted_never_loaded(craft, suffix, features, tmp_path):
    x, y = features
    grid = {"C": [0.1, 1.0]}
    first, _ = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=30), x, y, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.suffix == ".npz"
    entry.unlink()
    marker = tmp_path / "marker"
    crafted = entry.with_suffix(suffix)
    crafted.write_bytes(craft(marker))
    again, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=30), x, y, tmp_path / "cache")
    assert not reused and not marker.exists()
    np.testing.assert_array_equal(again.predict_proba(x), first.predict_proba(x))
    assert entry.is_file()  # a safe entry is written again
    third, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=30), x, y, tmp_path / "cache")
    assert reused and third.best_params_ == first.best_params_
    assert not marker.exists()


def test_a_search_served_from_the_cache_saves_as_its_best_estimator(features, tmp_path):
    x, y = features
    grid = {"C": [0.1, 1.0]}
    for _ in range(2):
        model, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=30), x, y,
                                   tmp_path / "cache")
    assert reused
    path = save_classifier(model, tmp_path / "run" / "classifier")
    assert path.suffix == ".npz" and load_classifier(path)[1]["best_params"] == model.best_params_


def test_a_pickle_file_is_never_unpickled_by_the_cache(features, tmp_path, monkeypatch):
    """Belt and braces: nothing in the fit cache or run loading calls pickle.load / joblib.load."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(joblib, "load", refuse)
    x, y = features
    for _ in range(2):
        fit_cached(build_classifier("knn", seed=0, n_samples_per_class=30), x, y, tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".skops"]
