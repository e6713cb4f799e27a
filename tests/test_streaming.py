"""The streamed classifier: trained block by block on features larger than memory, saved and exported as a
linear classifier."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from transferkit.errors import RecipeError
from transferkit.features.classifiers import check_classifier, fold_linear_classifier
from transferkit.features.persistence import load_classifier, save_classifier
from transferkit.features.store import FeatureStore
from transferkit.features.streaming import STREAMING, fit_streaming, gather, predict_proba_streaming


def blobs(n, dim, classes=3, shift=3.0, seed=0):
    """Gaussian features whose first dimensions say the class, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = rng.standard_normal((n, dim), dtype=np.float32) * 3 + 5
    features[np.arange(n), labels] += shift * 3
    return features, labels


@pytest.mark.parametrize("classes", [2, 3])
def test_fit_streaming_learns_in_blocks_and_folds_the_scaler_into_a_linear_classifier(tmp_path, classes):
    features, labels = blobs(3000, 20, classes)
    rows = np.random.default_rng(1).permutation(3000)
    train, val = rows[:2000], rows[2000:]
    model = fit_streaming(features, labels[train], train, size=256, seed=3)
    probabilities = predict_proba_streaming(model, features, val, size=300)
    assert (probabilities.argmax(1) == labels[val]).mean() > 0.9
    np.testing.assert_allclose(probabilities, model.predict_proba(features[val]))
    kernel, bias, _ = fold_linear_classifier(model)  # as export folds it: softmax(x W + b)
    logits = features[val] @ kernel + bias
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), probabilities, atol=1e-7)
    path = save_classifier(model, tmp_path / "classifier")
    assert path.suffix == ".npz"  # arrays, no pickle
    np.testing.assert_allclose(load_classifier(path)[0].predict_proba(features[val]), probabilities)
    again = fit_streaming(features, labels[train], train, size=256, seed=3)
    assert np.array_equal(again.coef_, model.coef_)  # the seed fixes block order and shuffles


def test_gather_reads_any_rows_in_blocks():
    features = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    rows = np.array([99, 0, 5, 5, 42, 7])
    assert np.array_equal(gather(features, rows, size=8), features[rows])


def test_sgd_streaming_is_checked_like_any_classifier():
    check_classifier(STREAMING, params={"alpha": 1e-3, "max_iter": 3}, class_weight="balanced")
    with pytest.raises(RecipeError, match="searches no grid"):
        check_classifier(STREAMING, grid={"alpha": [1e-4, 1e-3]})
    with pytest.raises(RecipeError, match="log_loss only"):
        check_classifier(STREAMING, params={"loss": "hinge"})
    with pytest.raises(RecipeError, match="no parameter 'epochs'"):
        check_classifier(STREAMING, params={"epochs": 3})


CHILD = textwrap.dedent("""
    import json, resource, sys
    import h5py, numpy as np, sklearn.linear_model, sklearn.preprocessing, sklearn.utils.class_weight
    import transferkit.features.classifiers
    from transferkit.features.streaming import fit_streaming, predict_proba_streaming

    heavy = sorted({"keras", "tensorflow", "torch", "jax"} & set(sys.modules))
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + CAP, size + CAP))
    with h5py.File(sys.argv[1], "r") as file:
        features, labels = file["synthetic/features"], file["synthetic/labels"][()]
        try:
            features[()]
            loaded = True
        except MemoryError:
            loaded = False
        rows = np.arange(len(labels))
        train, val = rows[rows % 5 != 0], rows[rows % 5 == 0]
        model = fit_streaming(features, labels[train], train, params={"max_iter": 2})
        accuracy = float((predict_proba_streaming(model, features, val).argmax(1) == labels[val]).mean())
    print(json.dumps({"heavy": heavy, "loaded": loaded, "accuracy": accuracy}))
""")


def test_features_larger_than_the_memory_cap_are_fitted_from_disk(tmp_path):
    n, dim, cap = 100_000, 1024, 200 * 2**20  # 400 MB of features, 200 MB more memory than the imports take
    labels = np.arange(n) % 3

    def embed(paths):  # noise, and the class in one of the first three features
        first = int(paths[0][3:])
        features = np.random.default_rng(first).standard_normal((len(paths), dim), dtype=np.float32)
        features[np.arange(len(paths)), labels[first:first + len(paths)]] += 3
        return features

    store = FeatureStore(tmp_path / "synthetic-0123456789ab.h5")
    store.compute("synthetic", [f"img{i}" for i in range(n)], labels, embed, key="k", chunk_size=4096,
                  progress=False, dim=dim, load=False)
    result = subprocess.run([sys.executable, "-c", CHILD.replace("CAP", str(cap)), str(store.path)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["heavy"] == [] and not outcome["loaded"]  # no Keras; the whole matrix does not fit
    assert outcome["accuracy"] > 0.9  # chance: 1/3


# --------------------------------------------------------------------------------------------
# In an extract run
# --------------------------------------------------------------------------------------------

def recipe_for(data, output, **extract):
    from transferkit.recipe import load_recipe

    return load_recipe({"name": "cd", "seed": 0, "data": {"train": str(data), "val": 0.25, "image_size": 128},
                        "backbone": {"name": "mobilenet", "alpha": 0.25, "weights": "imagenet"},
                        "extract": extract, "output": str(output)})


@pytest.fixture(scope="module")
def streamed(small_cats_dogs, home, tmp_path_factory):
    from transferkit.strategies.extract import extract

    gentle = {"learning_rate": "constant", "eta0": 0.001}  # on 30 images the default schedule saturates
    return extract(recipe_for(small_cats_dogs, tmp_path_factory.mktemp("streamed") / "run",
                              classifier={"name": STREAMING, "params": gentle}), progress=False)


def test_a_streamed_run_saves_predicts_exports_and_calibrates_as_a_linear_one(streamed, small_cats_dogs):
    from transferkit.features.transformer import pixels_of
    from transferkit.run import Run

    assert streamed.metrics["val"]["top1"] >= 0.6  # 30 training images: SGD's few steps do less than lbfgs
    assert (streamed.folder / "model" / "classifier.npz").is_file()
    assert "temperature" in json.loads((streamed.folder / "model" / "calibration.json").read_text())
    paths = sorted(str(path) for path in (small_cats_dogs / "cat").iterdir())[:4]
    expected = streamed.predict(paths)
    np.testing.assert_allclose(Run.load(streamed.folder).predict(paths), expected, atol=1e-5)
    model, _ = streamed.predictor.keras_model(STREAMING)  # the classifier folded into a Dense layer
    np.testing.assert_allclose(model.predict(pixels_of(paths, 128), verbose=0), expected, atol=1e-5)


def test_training_features_over_max_memory_features_are_streamed(streamed, small_cats_dogs, tmp_path, caplog):
    from transferkit.strategies.extract import extract

    auto = extract(recipe_for(small_cats_dogs, tmp_path / "auto", max_memory_features=0.01), progress=False)
    assert "exceed extract.max_memory_features (0 MiB): fitting sgd_streaming" in caplog.text
    named = extract(recipe_for(small_cats_dogs, tmp_path / "named", classifier=STREAMING), progress=False)
    assert np.array_equal(auto.predictor.classifier.coef_, named.predictor.classifier.coef_)
    kept = extract(recipe_for(small_cats_dogs, tmp_path / "kept", max_memory_features=1), progress=False)
    assert kept.info["best_params"]  # under the limit: logistic_regression and its grid search, as asked
