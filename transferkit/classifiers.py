"""scikit-learn classifiers for cached features: one table of short names, or any estimator by import path.

Every classifier is wrapped as ``StandardScaler -> estimator`` (unless ``standardize: false``) and,
when it has a grid, searched with a stratified, cross-validated ``GridSearchCV``.

Example:
    >>> model = build_classifier(ClassifierSpec("logistic_regression"), seed=0)
    >>> model.fit(features, labels).predict_proba(features[:3])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import RecipeError
from transferkit.recipe import ClassifierSpec, import_object


@dataclass(frozen=True)
class ClassifierInfo:
    """A named classifier: where it lives, sensible defaults and the grid searched by default."""
    path: str
    params: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)


CLASSIFIERS = {
    "logistic_regression": ClassifierInfo("sklearn.linear_model:LogisticRegression", {"max_iter": 3000},
                                          {"C": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]}),
    "linear_svm": ClassifierInfo("sklearn.svm:LinearSVC", {"max_iter": 5000}, {"C": [0.001, 0.01, 0.1, 1.0]}),
    "knn": ClassifierInfo("sklearn.neighbors:KNeighborsClassifier", {"weights": "distance"},
                          {"n_neighbors": [1, 5, 15]}),
    "random_forest": ClassifierInfo("sklearn.ensemble:RandomForestClassifier", {"n_estimators": 300, "n_jobs": -1},
                                    {"max_features": ["sqrt", 0.1]}),
}
LINEAR = ("sklearn.linear_model:LogisticRegression", "sklearn.svm:LinearSVC")


def classifier_info(spec: ClassifierSpec) -> ClassifierInfo:
    """The table entry for ``spec.name``, or an entry for an import path like ``sklearn.svm:SVC``."""
    if spec.name in CLASSIFIERS:
        return CLASSIFIERS[spec.name]
    if ":" in spec.name:
        return ClassifierInfo(spec.name)
    import difflib
    close = difflib.get_close_matches(spec.name, CLASSIFIERS, n=1)
    hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(CLASSIFIERS)} or an import path like sklearn.svm:SVC"
    raise RecipeError(f"extract.classifier.name: unknown classifier {spec.name!r}: {hint}")


def build_classifier(spec: ClassifierSpec, seed: int = 0, n_samples_per_class: int | None = None):
    """A scikit-learn estimator (Pipeline, maybe inside GridSearchCV) built from a recipe's classifier spec.

    Args:
        spec: the recipe's ``extract.classifier``.
        seed: random_state for estimators that take one.
        n_samples_per_class: the smallest class size, to pick the number of CV folds (2..5).
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    info = classifier_info(spec)
    estimator_class = import_object(info.path, "extract.classifier.name",
                                    "a scikit-learn estimator class, e.g. sklearn.svm:SVC")
    params = {**info.params, **spec.params}
    accepted = estimator_class().get_params()
    if "random_state" in accepted:
        params.setdefault("random_state", seed)
    if spec.class_weight is not None:
        if "class_weight" not in accepted:
            raise RecipeError(f"extract.classifier.class_weight: {spec.name} does not take class weights; "
                              f"remove the key or use logistic_regression, linear_svm or random_forest")
        params["class_weight"] = spec.class_weight
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RecipeError(f"extract.classifier.params: {spec.name} has no parameter {unknown[0]!r} "
                          f"(it takes: {', '.join(sorted(accepted))})")
    steps = [("scale", StandardScaler())] if spec.standardize else []
    model = Pipeline(steps + [("classifier", estimator_class(**params))])
    grid = info.grid if spec.grid is None else spec.grid
    if not grid:
        return model
    bad = sorted(set(grid) - set(accepted))
    if bad:
        raise RecipeError(f"extract.classifier.grid: {spec.name} has no parameter {bad[0]!r} "
                          f"(it takes: {', '.join(sorted(accepted))})")
    folds = max(2, min(5, n_samples_per_class or 5))
    return GridSearchCV(model, {f"classifier__{k}": list(v) for k, v in grid.items()},
                        cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=-1)


def fit_cached(model, features: np.ndarray, labels: np.ndarray, cache_dir) -> tuple[object, bool]:
    """Fit ``model``, or load the same fit from ``cache_dir`` when it was made before.

    The cache key is a digest of the features, labels, the unfitted estimator (all its
    parameters, seeds included) and the scikit-learn version, so anything that could change the
    fit refits.

    Returns:
        ``(fitted model, True if it came from the cache)``.
    """
    import joblib
    import sklearn

    from transferkit.cache import touch
    from transferkit.io import atomic_path

    key = joblib.hash([np.ascontiguousarray(features), np.ascontiguousarray(labels), model, sklearn.__version__])
    path = Path(cache_dir) / f"{key}.joblib"
    if path.is_file():
        try:
            fitted = joblib.load(path)
            touch(path)
            return fitted, True
        except Exception:  # a cache entry that cannot be read is refitted and rewritten
            pass
    model.fit(features, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        joblib.dump(model, tmp)
    return model, False


def predict_proba(model, features: np.ndarray) -> np.ndarray:
    """Class probabilities; a softmax of the decision function for estimators without ``predict_proba``."""
    if hasattr(model, "predict_proba"):
        try:
            return model.predict_proba(features)
        except AttributeError:  # e.g. LinearSVC inside a Pipeline exposes the method but cannot run it
            pass
    scores = model.decision_function(features)
    if scores.ndim == 1:  # binary: one score for the positive class
        scores = np.stack([-scores, scores], axis=1)
    scores = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(scores)
    return exp / exp.sum(axis=1, keepdims=True)
