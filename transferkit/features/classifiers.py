"""scikit-learn classifiers for cached features: one table of short names, or any estimator by import path.

Every classifier is wrapped as ``StandardScaler -> estimator`` (unless ``standardize=False``) and,
when it has a grid, searched with a stratified, cross-validated ``GridSearchCV``.

:func:`check_classifier` runs every check without building anything (``transferkit validate``);
:func:`fit_cached` fits in threads and keeps each fit, without pickle, under
``$TRANSFERKIT_HOME/classifiers``.

Example:
    >>> model = build_classifier("logistic_regression", class_weight="balanced", seed=0)
    >>> fit_classifier(model, features, labels).predict_proba(features[:3])
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import RecipeError, TransferkitError, did_you_mean
from transferkit.features.streaming import DEFAULTS as STREAMING_DEFAULTS, STREAMING
from transferkit.recipe import import_object

log = logging.getLogger("transferkit")

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
    # fitted from disk by transferkit.features.streaming.fit_streaming: max_iter is its number of epochs
    STREAMING: ClassifierInfo("sklearn.linear_model:SGDClassifier", STREAMING_DEFAULTS),
}


def classifier_info(name: str) -> ClassifierInfo:
    """The table entry for ``name``, or an entry for an import path like ``sklearn.svm:SVC``."""
    if name in CLASSIFIERS:
        return CLASSIFIERS[name]
    if ":" in name:
        return ClassifierInfo(name)
    hint = did_you_mean(name, CLASSIFIERS,
                        f"use one of {', '.join(CLASSIFIERS)} or an import path like sklearn.svm:SVC")
    raise RecipeError(f"unknown classifier {name!r}: {hint}", key="name")


def check_classifier(name: str = "logistic_regression", *, params: dict | None = None, grid: dict | None = None,
                     class_weight=None, seed: int = 0) -> tuple[type, dict, dict]:
    """Every check of :func:`build_classifier`, without building or fitting anything.

    The name or import path, that it names a scikit-learn classifier class (refused before it is
    ever called), the parameters, the grid's keys and values, and class_weight support.

    Args:
        name: a name in :data:`CLASSIFIERS` or an import path like ``sklearn.svm:SVC``.
        params: constructor arguments, over the table's defaults.
        grid: ``{parameter: [values]}`` to search with cross-validation; None: the table's
            grid, ``{}``: no search.
        class_weight: ``"balanced"``, ``{label: weight}`` or None.
        seed: random_state for estimators that take one.

    Returns:
        ``(estimator class, its parameters, the grid to search: {} for none)``.

    Raises:
        RecipeError: keyed by the argument (``name``, ``params``, ``grid.C``, ``class_weight``).
    """
    info = classifier_info(name)
    estimator_class = _estimator_class(name, info.path)
    accepted = _parameter_names(estimator_class)
    params = {**info.params, **(params or {})}
    if "random_state" in accepted:
        params.setdefault("random_state", seed)
    if class_weight is not None:
        if "class_weight" not in accepted:
            raise RecipeError(f"{name} does not take class weights; remove the key or use logistic_regression, "
                              "linear_svm or random_forest", key="class_weight")
        params["class_weight"] = class_weight
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RecipeError(f"{name} has no parameter {unknown[0]!r} (it takes: {', '.join(sorted(accepted))})",
                          key="params")
    missing = sorted(set(_required_parameters(estimator_class)) - set(params))
    if missing:
        raise RecipeError(f"{name} needs {missing[0]!r}: give it under params", key="params")
    grid = dict(info.grid if grid is None else grid)
    bad = sorted(set(grid) - set(accepted))
    if bad:
        raise RecipeError(f"{name} has no parameter {bad[0]!r} (it takes: {', '.join(sorted(accepted))})",
                          key="grid")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise RecipeError(f"give a non-empty list of values to try, not {values!r}", key=f"grid.{key}")
    if name == STREAMING and grid:
        raise RecipeError(f"{STREAMING} streams the features from disk and searches no grid: remove the grid and "
                          "set params.alpha (default 1e-4) instead", key="grid")
    if name == STREAMING and params["loss"] != "log_loss":
        raise RecipeError(f"{STREAMING} trains with loss log_loss only (its probabilities need it): remove "
                          "params.loss", key="params")
    return estimator_class, params, grid


#: What a grid search can pick the best parameters by; it scores both, so both are reported.
SELECT_BY = ("log_loss", "accuracy")


def build_classifier(name: str = "logistic_regression", *, params: dict | None = None, grid: dict | None = None,
                     class_weight=None, standardize: bool = True, seed: int = 0,
                     n_samples_per_class: int | None = None, select_by: str = "log_loss"):
    """A scikit-learn estimator: ``[StandardScaler ->] classifier`` in a Pipeline, inside a
    GridSearchCV when there is a grid.

    Args:
        name, params, grid, class_weight, seed: as in :func:`check_classifier`.
        standardize: scale each feature to zero mean and unit variance first.
        n_samples_per_class: the smallest class size, to pick the number of CV folds (2..5).
        select_by: ``"log_loss"`` (default: on small folds accuracy ties often, and a tie goes to
            the first, most regularised value) or ``"accuracy"``; the search scores both
            (:func:`cv_scores`).

    Raises:
        RecipeError: whatever :func:`check_classifier` finds.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    estimator_class, params, grid = check_classifier(name, params=params, grid=grid, class_weight=class_weight,
                                                     seed=seed)
    if select_by not in SELECT_BY:
        raise RecipeError(f"expected one of {', '.join(SELECT_BY)}, got {select_by!r}", key="select_by")
    steps = [("scale", StandardScaler())] if standardize else []
    model = Pipeline(steps + [("classifier", estimator_class(**params))])
    if not grid:
        return model
    folds = max(2, min(5, n_samples_per_class or 5))
    return GridSearchCV(model, {f"classifier__{k}": list(v) for k, v in grid.items()},
                        scoring={"log_loss": negative_log_loss, "accuracy": "accuracy"}, refit=select_by,
                        cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=-1)


def negative_log_loss(model, features: np.ndarray, labels: np.ndarray) -> float:
    """A scorer: minus the log-loss of :func:`predict_proba`'s probabilities, the ones a run predicts
    (for a classifier without ``predict_proba``, the softmax of its decision function)."""
    from sklearn.metrics import log_loss

    return -float(log_loss(labels, predict_proba(model, features), labels=model.classes_))


def cv_scores(search) -> dict | None:
    """The cross-validated ``{"log_loss": ..., "accuracy": ...}`` of a grid search's best parameters
    (from a cached fit too); None for a model without a search or a fit cached before both were scored."""
    if hasattr(search, "cv_results_") and "mean_test_log_loss" in search.cv_results_:
        best = search.best_index_
        return {"log_loss": -float(search.cv_results_["mean_test_log_loss"][best]),
                "accuracy": float(search.cv_results_["mean_test_accuracy"][best])}
    return getattr(search, "cv_scores_", None)


def _estimator_class(name: str, path: str) -> type:
    """The class an import path names, refused unless it is a scikit-learn classifier class."""
    from sklearn.base import BaseEstimator

    found = import_object(path, "name", "a scikit-learn estimator class, e.g. sklearn.svm:SVC")
    if isinstance(found, type) and issubclass(found, BaseEstimator) and hasattr(found, "fit") and (
            hasattr(found, "predict_proba") or hasattr(found, "decision_function")):
        return found
    what = (f"the class {found.__name__}, which is not a scikit-learn classifier" if isinstance(found, type)
            else "a function" if inspect.isroutine(found) else f"a {type(found).__name__}")
    raise RecipeError(f"{name!r} is {what}: give a scikit-learn classifier class (with fit and predict_proba or "
                      f"decision_function), e.g. sklearn.svm:SVC, or one of {', '.join(CLASSIFIERS)}", key="name")


def _parameter_names(estimator_class: type) -> list[str]:
    """The estimator's parameters, read from its ``__init__`` signature (scikit-learn's own way), not by calling it."""
    try:
        return list(estimator_class._get_param_names())
    except RuntimeError:  # **kwargs in __init__ (e.g. xgboost): only an instance knows
        return list(estimator_class().get_params())


def _required_parameters(estimator_class: type) -> list[str]:
    signature = inspect.signature(estimator_class.__init__)
    return [name for name, parameter in list(signature.parameters.items())[1:]
            if parameter.default is inspect.Parameter.empty
            and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]


def fit_classifier(model, features: np.ndarray, labels: np.ndarray):
    """``model.fit(features, labels)`` in joblib's threads instead of worker processes.

    A grid search (``n_jobs=-1``) would otherwise start loky processes, which outlive a fit that is
    killed. scikit-learn's solvers spend their time in BLAS and compiled code that release the GIL;
    with one BLAS/OpenMP thread per search thread (what loky gives each worker) the threads keep
    every core busy without oversubscribing it: the default logistic_regression search on flowers5's
    3453 x 1280 MobileNetV2 features took 59 s against loky's 78-89 s on 2 busy cores, with the same
    best C and cv accuracy (benchmarks/classifier_fit.py).

    Returns:
        The fitted ``model``.
    """
    import joblib
    from threadpoolctl import threadpool_limits

    with joblib.parallel_config(backend="threading"), threadpool_limits(1):
        return model.fit(features, labels)


def fit_cached(model, features: np.ndarray, labels: np.ndarray, cache_dir) -> tuple[object, bool]:
    """Fit ``model``, or load the same fit from ``cache_dir`` when it was made before.

    The cache key is a digest of the features, labels, the unfitted estimator (all its
    parameters, seeds included) and the scikit-learn version, so anything that could change the
    fit refits. Fits are stored without pickle (:mod:`transferkit.features.persistence`, named
    ``<32 hex digits>.npz`` or ``.skops``); an entry that cannot be opened safely (damaged, of an
    older format, holding untrusted types) is refitted and replaced, never loaded.

    Returns:
        ``(fitted model, True if it came from the cache)``. A grid search from the cache carries
        ``best_estimator_``, ``best_params_`` and ``best_score_`` (not ``cv_results_``).
    """
    import joblib
    import sklearn

    from transferkit.features.cache import touch
    from transferkit.features.persistence import load_classifier, save_classifier, saved_classifier

    key = joblib.hash([np.ascontiguousarray(features), np.ascontiguousarray(labels), model, sklearn.__version__])
    stem = Path(cache_dir) / key
    path = saved_classifier(stem)
    if path is not None:
        try:
            fitted, search = load_classifier(path)
        except TransferkitError as error:
            log.info("classifier cache: not using %s (%s); fitting again", path.name, error)
        else:
            touch(path)
            return _with_best(model, fitted, search), True
    fit_classifier(model, features, labels)
    try:  # the fit is done: a cache that cannot keep it is no failure
        save_classifier(model, stem, only_trusted=True)
    except TransferkitError as error:  # e.g. an import-path classifier: it would never be loaded back
        log.info("classifier cache: not keeping this fit (%s)", error)
    except OSError as error:
        log.warning("classifier cache: could not keep this fit in %s (%s)", cache_dir, error.strerror or error)
    return model, False


def _with_best(model, fitted, search: dict):
    """The unfitted grid search ``model`` made to serve its cached best estimator; else ``fitted`` itself."""
    if not hasattr(model, "param_grid") or not search:
        return fitted
    model.best_estimator_, model.best_params_, model.best_score_ = fitted, search["best_params"], search["best_score"]
    model.cv_scores_ = search.get("cv")
    return model


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


def fold_linear_classifier(estimator, name: str = "this classifier"):
    """A fitted `[StandardScaler ->] LogisticRegression | LinearSVC` as one softmax-ready linear map.

    Args:
        estimator: the fitted classifier, a `Pipeline` (maybe inside `GridSearchCV`) or a bare
            linear model.
        name: what to call the classifier in the error message.

    Returns:
        `(kernel [d, C], bias [C], classes [C])`, float64: `softmax(x @ kernel + bias)` equals
        `transferkit.features.classifiers.predict_proba(estimator, x)`; `classes` are the label of each output.

    Raises:
        TransferkitError: not a linear classifier, or a step other than `StandardScaler` before it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    estimator = getattr(estimator, "best_estimator_", estimator)
    steps = [step for _, step in getattr(estimator, "steps", [(None, estimator)]) if step not in (None, "passthrough")]
    *scalers, linear = steps
    if not isinstance(linear, (LogisticRegression, LinearSVC)):
        raise TransferkitError(f"export needs a linear classifier (logistic_regression or linear_svm); this run "
                               f"uses {name}: use `transferkit predict` instead")
    weights, bias = linear.coef_.astype(np.float64), linear.intercept_.astype(np.float64)
    for scaler in reversed(scalers):  # fold from the classifier inwards
        if not isinstance(scaler, StandardScaler):
            raise TransferkitError(f"export can fold StandardScaler only, not {type(scaler).__name__}: "
                                   "use `transferkit predict` instead")
        scale = scaler.scale_ if scaler.scale_ is not None else np.ones(weights.shape[1])
        mean = scaler.mean_ if scaler.with_mean else np.zeros(weights.shape[1])
        weights, bias = weights / scale, bias - weights @ (mean / scale)
    if len(weights) == 1:  # binary score z: LogisticRegression gives softmax([0, z]), LinearSVC softmax([-z, z])
        sign = 0.0 if isinstance(linear, LogisticRegression) else -1.0
        weights, bias = np.concatenate([sign * weights, weights]), np.concatenate([sign * bias, bias])
    return weights.T, bias, linear.classes_
