"""Classifiers on features: the table, import paths, class weights and the fit cache."""

import numpy as np
import pytest

from transferkit.classifiers import build_classifier, fit_cached, predict_proba
from transferkit.errors import RecipeError
from transferkit.recipe import ClassifierSpec


@pytest.fixture
def imbalanced():
    """Two overlapping Gaussian classes, 90 vs 10 samples."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (90, 4)), rng.normal(1, 1, (10, 4))]).astype("float32")
    return x, np.array([0] * 90 + [1] * 10)


def test_class_weight_balanced_predicts_the_rare_class_more_often(imbalanced):
    x, y = imbalanced
    plain = build_classifier(ClassifierSpec(grid={}), seed=0).fit(x, y)
    balanced = build_classifier(ClassifierSpec(grid={}, class_weight="balanced"), seed=0).fit(x, y)
    assert balanced.predict(x).sum() > plain.predict(x).sum()
    assert balanced.named_steps["classifier"].class_weight == "balanced"


def test_class_weight_on_a_classifier_without_it_names_the_key():
    with pytest.raises(RecipeError, match="extract.classifier.class_weight: knn does not take class weights"):
        build_classifier(ClassifierSpec("knn", class_weight="balanced"))


def test_any_estimator_by_import_path_with_its_own_grid(imbalanced):
    x, y = imbalanced
    model = build_classifier(ClassifierSpec("sklearn.svm:SVC",
                                            grid={"C": [0.1, 1.0]}), seed=0, n_samples_per_class=10).fit(x, y)
    assert type(model.best_estimator_.named_steps["classifier"]).__name__ == "SVC"
    assert model.best_params_["classifier__C"] in (0.1, 1.0)
    np.testing.assert_allclose(predict_proba(model, x).sum(axis=1), 1, atol=1e-6)


def test_bad_import_path_and_unknown_parameter_are_recipe_errors():
    with pytest.raises(RecipeError, match="cannot import 'sklearn.svm:SVQ'"):
        build_classifier(ClassifierSpec("sklearn.svm:SVQ"))
    with pytest.raises(RecipeError, match="has no parameter 'gamma'"):
        build_classifier(ClassifierSpec("logistic_regression", params={"gamma": 1}))


def test_fit_cache_reuses_an_identical_fit_and_refits_on_any_change(imbalanced, tmp_path):
    x, y = imbalanced
    spec = ClassifierSpec(grid={"C": [0.1, 1.0]})
    first, reused = fit_cached(build_classifier(spec, seed=0, n_samples_per_class=10), x, y, tmp_path)
    assert not reused
    again, reused = fit_cached(build_classifier(spec, seed=0, n_samples_per_class=10), x, y, tmp_path)
    assert reused and again.best_params_ == first.best_params_
    np.testing.assert_array_equal(again.predict_proba(x), first.predict_proba(x))
    for changed in [(x + 0.01, y, 0, spec), (x, y[::-1], 0, spec), (x, y, 1, spec),
                    (x, y, 0, ClassifierSpec(grid={"C": [0.1]}))]:
        cx, cy, seed, cspec = changed
        _, reused = fit_cached(build_classifier(cspec, seed=seed, n_samples_per_class=10), cx, cy, tmp_path)
        assert not reused
    assert len(list(tmp_path.glob("*.joblib"))) == 5
