"""Classifiers on features: the table, import paths, class weights, the checks, the fit cache and its threads."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transferkit.features.classifiers import (build_classifier, check_classifier, cv_scores, fit_cached,
                                              negative_log_loss, predict_proba)
from transferkit.errors import RecipeError


@pytest.fixture
def imbalanced():
    """Two overlapping Gaussian classes, 90 vs 10 samples."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (90, 4)), rng.normal(1, 1, (10, 4))]).astype("float32")
    return x, np.array([0] * 90 + [1] * 10)


def test_class_weight_balanced_predicts_the_rare_class_more_often(imbalanced):
    x, y = imbalanced
    plain = build_classifier(grid={}, seed=0).fit(x, y)
    balanced = build_classifier(grid={}, class_weight="balanced", seed=0).fit(x, y)
    assert balanced.predict(x).sum() > plain.predict(x).sum()
    assert balanced.named_steps["classifier"].class_weight == "balanced"


def test_class_weight_on_a_classifier_without_it_names_the_key():
    with pytest.raises(RecipeError, match="^class_weight: knn does not take class weights"):
        build_classifier("knn", class_weight="balanced")
    with pytest.raises(RecipeError, match="^extract.classifier.class_weight: knn does not take class weights"), \
            RecipeError.under("extract.classifier"):
        build_classifier("knn", class_weight="balanced")


def test_any_estimator_by_import_path_with_its_own_grid(imbalanced):
    x, y = imbalanced
    model = build_classifier("sklearn.svm:SVC", grid={"C": [0.1, 1.0]}, seed=0, n_samples_per_class=10).fit(x, y)
    assert type(model.best_estimator_.named_steps["classifier"]).__name__ == "SVC"
    assert model.best_params_["classifier__C"] in (0.1, 1.0)
    np.testing.assert_allclose(predict_proba(model, x).sum(axis=1), 1, atol=1e-6)


def test_the_grid_is_chosen_by_cross_validated_log_loss_unless_accuracy_is_asked(imbalanced, tmp_path):
    from sklearn.metrics import log_loss

    x, y = imbalanced
    grid = {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}
    by_loss = build_classifier(grid=grid, seed=0, n_samples_per_class=10).fit(x, y)
    by_accuracy = build_classifier(grid=grid, seed=0, n_samples_per_class=10, select_by="accuracy").fit(x, y)
    losses = -by_loss.cv_results_["mean_test_log_loss"]
    accuracies = by_accuracy.cv_results_["mean_test_accuracy"]
    assert by_loss.best_index_ == int(np.argmin(losses)) and by_accuracy.best_index_ == int(np.argmax(accuracies))
    # 90 vs 10 overlapping samples: every C below 1 predicts the majority class, a tie on accuracy
    # that goes to the smallest C; log-loss tells the calibrated fit from the over-regularised one
    assert by_loss.best_params_ != by_accuracy.best_params_
    assert cv_scores(by_loss) == pytest.approx({"log_loss": losses[by_loss.best_index_],
                                                "accuracy": by_loss.cv_results_["mean_test_accuracy"][by_loss.best_index_]})
    assert negative_log_loss(by_loss, x, y) == pytest.approx(-log_loss(y, predict_proba(by_loss, x)))
    cached, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=10), x, y, tmp_path)
    again, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=10), x, y, tmp_path)
    assert reused and cv_scores(again) == pytest.approx(cv_scores(cached)) and cv_scores(again) is not None
    with pytest.raises(RecipeError, match="^select_by: expected one of log_loss, accuracy, got 'f1'"):
        build_classifier(grid=grid, select_by="f1")


def test_bad_import_path_and_unknown_parameter_are_recipe_errors():
    with pytest.raises(RecipeError, match="cannot import 'sklearn.svm:SVQ'"):
        build_classifier("sklearn.svm:SVQ")
    with pytest.raises(RecipeError, match="has no parameter 'gamma'"):
        build_classifier("logistic_regression", params={"gamma": 1})


def test_fit_cache_reuses_an_identical_fit_and_refits_on_any_change(imbalanced, tmp_path):
    x, y = imbalanced
    grid = {"C": [0.1, 1.0]}
    first, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=10), x, y, tmp_path)
    assert not reused
    again, reused = fit_cached(build_classifier(grid=grid, seed=0, n_samples_per_class=10), x, y, tmp_path)
    assert reused and again.best_params_ == first.best_params_
    np.testing.assert_array_equal(again.predict_proba(x), first.predict_proba(x))
    for changed in [(x + 0.01, y, 0, grid), (x, y[::-1], 0, grid), (x, y, 1, grid), (x, y, 0, {"C": [0.1]})]:
        cx, cy, seed, cgrid = changed
        _, reused = fit_cached(build_classifier(grid=cgrid, seed=seed, n_samples_per_class=10), cx, cy, tmp_path)
        assert not reused
    assert len(list(tmp_path.glob("*.npz"))) == 5 and len(list(tmp_path.iterdir())) == 5


@pytest.mark.parametrize("name, said", [
    ("sys:exit", "extract.classifier.name: 'sys:exit' is a function"),
    ("os:system", "extract.classifier.name: 'os:system' is a function"),
    ("sklearn.metrics:accuracy_score", "extract.classifier.name: 'sklearn.metrics:accuracy_score' is a function"),
    ("pathlib:Path", "the class Path, which is not a scikit-learn classifier"),
    ("sklearn.preprocessing:StandardScaler", "the class StandardScaler, which is not a scikit-learn classifier"),
])
def test_an_import_path_that_is_not_a_classifier_class_is_refused_before_it_is_called(name, said, monkeypatch):
    def called(*args, **kwargs):
        raise AssertionError("called")

    monkeypatch.setattr(sys, "exit", called)
    monkeypatch.setattr(os, "system", called)
    for check in (check_classifier, build_classifier):
        with pytest.raises(RecipeError) as error, RecipeError.under("extract.classifier"):
            check(name)
        assert said in str(error.value) and "e.g. sklearn.svm:SVC" in str(error.value)


@pytest.mark.parametrize("arguments, said", [
    (dict(name="logistic_regresion"), "extract.classifier.name: unknown classifier 'logistic_regresion': "
                                      "did you mean logistic_regression?"),
    (dict(name="knn", params={"C": 1}), "extract.classifier.params: knn has no parameter 'C'"),
    (dict(name="knn", grid={"C": [1]}), "extract.classifier.grid: knn has no parameter 'C'"),
    (dict(name="knn", grid={"n_neighbors": 5}), "extract.classifier.grid.n_neighbors: give a non-empty list"),
    (dict(name="knn", grid={"n_neighbors": []}), "extract.classifier.grid.n_neighbors: give a non-empty list"),
    (dict(name="knn", class_weight="balanced"), "extract.classifier.class_weight: knn does not take"),
    (dict(name="sklearn.ensemble:VotingClassifier"), "extract.classifier.params: sklearn.ensemble:"
                                                     "VotingClassifier needs 'estimators'"),
])
def test_check_classifier_finds_what_build_would_without_building(arguments, said):
    with pytest.raises(RecipeError) as error, RecipeError.under("extract.classifier"):
        check_classifier(**arguments)
    assert str(error.value).startswith(said) and "\n" not in str(error.value)
    assert error.value.key.startswith("extract.classifier.")  # the building block named its argument


def test_check_classifier_returns_what_build_uses():
    from sklearn.neighbors import KNeighborsClassifier

    estimator_class, params, grid = check_classifier("knn", params={"p": 1}, seed=3)
    assert estimator_class is KNeighborsClassifier and params == {"weights": "distance", "p": 1}
    assert grid == {"n_neighbors": [1, 5, 15]}
    assert check_classifier("random_forest", grid={}, seed=3)[1]["random_state"] == 3


FIT_FOREVER = """
import sys
import numpy as np
from transferkit.features.classifiers import build_classifier, fit_classifier
rng = np.random.default_rng(0)
x, y = rng.normal(size=(3000, 300)), np.arange(3000) % 5
model = build_classifier(grid={"C": list(np.logspace(-3, 3, 400))}, seed=0, n_samples_per_class=600)
print("fitting", flush=True)
fit_classifier(model, x, y)
"""


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_fit_killed_with_sigkill_leaves_no_processes_behind():
    fit = subprocess.Popen([sys.executable, "-c", FIT_FOREVER], stdout=subprocess.PIPE, text=True)
    try:
        assert fit.stdout.readline().strip() == "fitting"
        time.sleep(3)  # well into the grid search, its workers started
        assert fit.poll() is None, "the fit ended before it could be killed"
        started = descendants(fit.pid)
        fit.send_signal(signal.SIGKILL)
        fit.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if alive(pid)]
        assert not started  # threads, not worker processes
    finally:
        if fit.poll() is None:
            fit.kill()
