"""Fitted scikit-learn classifiers saved without pickle, and opened without running code.

One of two formats, by what the classifier is:

- ``<stem>.npz``: a linear classifier (``LogisticRegression`` or ``LinearSVC``, alone or after
  ``StandardScaler`` steps in a ``Pipeline``) as plain arrays, with its parameters and small
  metadata as JSON text in the same file. It is read with ``allow_pickle=False`` and rebuilt from
  these three classes only, so it predicts exactly as before saving.
- ``<stem>.skops``: any other estimator, through ``skops.io``. It is opened only when every type the
  file names is one of :func:`trusted_types` (transferkit's own classifiers and what they hold) or
  one the caller trusts by name.

A fitted ``GridSearchCV`` is saved as its best estimator; ``best_params_`` and ``best_score_``
travel along as metadata. Anything else is refused with a one-line :class:`TransferkitError`.

Example:
    >>> path = save_classifier(search, "runs/flowers/model/classifier")   # .../classifier.npz
    >>> model, search_summary = load_classifier(path)                  # Pipeline, {"best_params": ...}
"""

from __future__ import annotations

import functools
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.io import atomic_path

log = logging.getLogger("transferkit")

FORMAT = "transferkit.classifier"
VERSION = 1
SUFFIXES = (".npz", ".skops")  # the formats, in the order they are looked for
# the kinds of skops node a classifier needs: containers, JSON values, arrays, estimators, trees
_SKOPS_LOADERS = frozenset({"DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode", "NdArrayNode",
                            "ObjectNode", "TreeNode"})
_FITTED_NAME = re.compile(r"[a-z][a-z0-9_]*_")  # scikit-learn's learned attributes: coef_, classes_...


def save_classifier(estimator, stem: str | Path, *, only_trusted: bool = False) -> Path:
    """Write a fitted classifier to ``<stem>.npz`` (linear) or ``<stem>.skops`` (anything else), atomically.

    Files of the other format (and an old pickled ``<stem>.joblib``) are removed, so that a stem
    names one classifier.

    Args:
        estimator: the fitted classifier, maybe a fitted ``GridSearchCV``.
        stem: the path without its suffix.
        only_trusted: refuse (rather than write, with a warning) a file that
            :func:`load_classifier` opens only with ``trusted=``.

    Returns:
        The path written.

    Raises:
        TransferkitError: a search without a refitted best estimator, an estimator skops cannot
            write, or (``only_trusted``) one of types that are not trusted.
    """
    stem = Path(stem)
    best = _best_estimator(estimator)
    metadata = {"format": FORMAT, "version": VERSION, "search": _search_summary(estimator)}
    arrays = _linear_arrays(best, metadata)
    path = stem.with_name(stem.name + (".npz" if arrays is not None else ".skops"))
    if arrays is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as file:  # a file object: savez would add .npz to a name
            np.savez(file, metadata=np.array(json.dumps(metadata)), **arrays)
    else:
        import skops.io

        try:
            data = skops.io.dumps({"estimator": best, "metadata": json.dumps(metadata)})
        except Exception as error:  # noqa: BLE001 - whatever skops cannot write, in one line
            raise TransferkitError(f"cannot save a {type(best).__name__} without pickle "
                                   f"({type(error).__name__}: {error}): use one of transferkit's classifiers "
                                   f"(logistic_regression, linear_svm, knn, random_forest)") from None
        untrusted = _untrusted(_skops_types(data)[0], ())
        if untrusted and only_trusted:
            raise TransferkitError(f"{path}: not written: it would hold types transferkit does not open "
                                   f"({', '.join(untrusted)})")
        if untrusted:
            log.warning("%s holds types transferkit does not open by default (%s): loading it needs "
                        "trusted=%r", path, ", ".join(untrusted), untrusted)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    for other in (*SUFFIXES, ".joblib"):
        if other != path.suffix:
            stem.with_name(stem.name + other).unlink(missing_ok=True)
    return path


def saved_classifier(stem: str | Path) -> Path | None:
    """The file :func:`save_classifier` wrote for ``stem`` (``.npz`` or ``.skops``), or None."""
    stem = Path(stem)
    return next((path for path in (stem.with_name(stem.name + s) for s in SUFFIXES) if path.is_file()), None)


def load_classifier(path: str | Path, trusted: Iterable[str] = ()) -> tuple[object, dict]:
    """Read a classifier written by :func:`save_classifier`, without running code from the file.

    Args:
        path: the ``.npz`` or ``.skops`` file.
        trusted: type names (``module.Class``, as the error lists them) to open besides
            :func:`trusted_types`, for a ``.skops`` file whose source you trust.

    Returns:
        ``(fitted estimator, search summary)``: the summary is ``{"best_params": ..., "best_score": ...}``
        when a grid search was saved, else ``{}``.

    Raises:
        TransferkitError: unreadable, of an unknown format, holding an object array, or naming a
            type that is not trusted.
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            estimator, metadata = _load_linear(path)
        elif path.suffix == ".skops":
            estimator, metadata = _load_skops(path, tuple(trusted))
        else:
            raise TransferkitError(f"{path}: not a classifier file (.npz or .skops)")
    except TransferkitError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file is a one-line error, never a traceback
        raise TransferkitError(f"{path}: cannot read this classifier ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else 'damaged file'}): "
                               f"fit it again with `transferkit extract`") from None
    search = metadata.get("search")
    return estimator, (search if isinstance(search, dict) and {"best_params", "best_score"} <= search.keys() else {})


@functools.cache
def trusted_types() -> frozenset[str]:
    """The types a ``.skops`` classifier may hold: transferkit's classifiers, their parts, numbers and containers."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import _dist_metrics
    from sklearn.neighbors import BallTree, KDTree, KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from sklearn.tree import DecisionTreeClassifier
    from sklearn.tree._tree import Tree

    distances = [getattr(_dist_metrics, f"{name}Distance64") for name in ("Euclidean", "Manhattan", "Chebyshev",
                                                                          "Minkowski")]
    types = [Pipeline, StandardScaler, LogisticRegression, LinearSVC, KNeighborsClassifier, KDTree, BallTree,
             *distances, RandomForestClassifier, DecisionTreeClassifier, Tree,
             bool, int, float, str, list, tuple, dict, type(None), np.ndarray,
             np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64]
    return frozenset(f"{t.__module__}.{t.__qualname__}" for t in types)


# --------------------------------------------------------------------------------------------
# Linear classifiers as arrays
# --------------------------------------------------------------------------------------------

@functools.cache
def _linear_types() -> dict[str, type]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return {cls.__name__: cls for cls in (StandardScaler, LogisticRegression, LinearSVC)}


def _linear_arrays(estimator, metadata: dict) -> dict[str, np.ndarray] | None:
    """The arrays of a ``[StandardScaler ->] LogisticRegression | LinearSVC``, its steps described in
    ``metadata``; None when the estimator is not one, or holds a value arrays and JSON cannot keep."""
    from sklearn.pipeline import Pipeline

    pipeline = type(estimator) is Pipeline
    steps = list(estimator.steps) if pipeline else [("classifier", estimator)]
    types = [type(step).__name__ for _, step in steps]
    if (types[-1] not in ("LogisticRegression", "LinearSVC") or any(t != "StandardScaler" for t in types[:-1])
            or any(type(step) is not _linear_types()[t] for (_, step), t in zip(steps, types))):
        return None
    arrays, described = {}, []
    for index, (name, step) in enumerate(steps):
        params = step.get_params(deep=False)
        state = {key: value for key, value in vars(step).items() if key not in params}
        if not all(_FITTED_NAME.fullmatch(key) for key in state):
            return None
        fitted, numpy_scalars = {}, []
        for key, value in state.items():
            if isinstance(value, (np.ndarray, np.generic)):
                if np.asarray(value).dtype.kind not in "biufU":
                    return None
                arrays[f"{index}.{key}"] = np.asarray(value)
                if isinstance(value, np.generic):
                    numpy_scalars.append(key)
            elif _json_scalar(value):
                fitted[key] = value
            else:
                return None
        encoded = {key: _encode(value) for key, value in params.items()}
        if any(value is _UNSTORABLE for value in encoded.values()):
            return None
        described.append({"name": name, "type": types[index], "params": encoded, "fitted": fitted,
                          "numpy_scalars": numpy_scalars})
    metadata["linear"] = {"pipeline": pipeline, "steps": described}
    return arrays


def _load_linear(path: Path):
    from sklearn.pipeline import Pipeline

    with np.load(path, allow_pickle=False) as file:
        arrays = {name: file[name] for name in file.files}
    metadata = _metadata(str(arrays.pop("metadata")), path)
    linear = metadata.get("linear")
    if not isinstance(linear, dict) or not linear.get("steps"):
        raise TransferkitError(f"{path}: not a transferkit linear classifier (no steps): fit it again with "
                               f"`transferkit extract`")
    steps = []
    for index, described in enumerate(linear["steps"]):
        cls = _linear_types().get(described["type"])
        if cls is None:
            raise TransferkitError(f"{path}: names {described['type']!r}, which is not a linear classifier "
                                   f"transferkit stores as arrays: fit it again with `transferkit extract`")
        step = cls().set_params(**{key: _decode(value) for key, value in described["params"].items()})
        prefix = f"{index}."
        state = {**described["fitted"], **{key[len(prefix):]: value for key, value in arrays.items()
                                           if key.startswith(prefix)}}
        for key, value in state.items():
            if not _FITTED_NAME.fullmatch(key) or hasattr(cls, key) or not (
                    isinstance(value, np.ndarray) or _json_scalar(value)):
                raise TransferkitError(f"{path}: {described['type']} has no learned attribute {key!r}: "
                                       f"fit it again with `transferkit extract`")
            setattr(step, key, value[()] if key in described["numpy_scalars"] else value)
        steps.append((described["name"], step))
    return (Pipeline(steps) if linear["pipeline"] else steps[0][1]), metadata


_UNSTORABLE = object()


def _json_scalar(value) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def _encode(value):
    """A parameter as JSON: scalars as they are, a dict (class_weight) as ``{"items": [[key, value], ...]}``."""
    if isinstance(value, np.generic):
        value = value.item()
    if _json_scalar(value):
        return value
    if type(value) is dict and all(_json_scalar(k) and _json_scalar(v) for k, v in value.items()):
        return {"items": [[key, item] for key, item in value.items()]}
    return _UNSTORABLE


def _decode(value):
    if isinstance(value, dict):
        return {key: item for key, item in value["items"]}
    return value


def _metadata(text: str, path: Path) -> dict:
    metadata = json.loads(text)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise TransferkitError(f"{path}: not a {FORMAT} file of version {VERSION}: "
                               f"fit it again with `transferkit extract`")
    return metadata


# --------------------------------------------------------------------------------------------
# Other estimators through skops
# --------------------------------------------------------------------------------------------

def _load_skops(path: Path, trusted: tuple[str, ...]):
    import skops.io

    data = path.read_bytes()
    types, loaders = _skops_types(data)
    if loaders - _SKOPS_LOADERS:
        raise TransferkitError(f"{path}: holds objects transferkit does not open (skops "
                               f"{', '.join(sorted(loaders - _SKOPS_LOADERS))}): "
                               f"fit it again with `transferkit extract`")
    untrusted = _untrusted(types, trusted)
    if untrusted:
        raise TransferkitError(
            f"{path}: holds types transferkit does not open ({', '.join(untrusted[:5])}"
            f"{', ...' if len(untrusted) > 5 else ''}); it opens only its own classifiers (logistic_regression, "
            f"linear_svm, knn, random_forest): if you trust where this file came from, open it with "
            f"{' '.join('--trust ' + name for name in untrusted)} (Python: trusted={untrusted!r})")
    saved = skops.io.loads(data, trusted=sorted(trusted_types() | set(trusted)))
    if not isinstance(saved, dict) or "estimator" not in saved or not isinstance(saved.get("metadata"), str):
        raise TransferkitError(f"{path}: not a transferkit classifier file: fit it again with `transferkit extract`")
    broken = _broken_tree(saved["estimator"])
    if broken:
        raise TransferkitError(f"{path}: {broken}, which would make predicting read outside its arrays: "
                               f"fit it again with `transferkit extract`")
    return saved["estimator"], _metadata(saved["metadata"], path)


def _broken_tree(estimator, n_features: int | None = None) -> str | None:
    """What is wrong with the index arrays of the decision trees or neighbour trees in ``estimator``
    (compiled code follows them unchecked), or None when they are consistent."""
    from sklearn.neighbors import BallTree, KDTree
    from sklearn.tree._tree import Tree

    n_features = getattr(estimator, "n_features_in_", n_features)
    if isinstance(estimator, Tree):
        n, left, right = estimator.node_count, estimator.children_left, estimator.children_right
        inner, ids = left != -1, np.arange(n)
        features = estimator.feature[inner]
        if not (n >= 1 and len(left) == len(right) == len(estimator.feature) == len(estimator.value) == n
                and np.array_equal(inner, right != -1)
                and np.all((left[inner] > ids[inner]) & (right[inner] > ids[inner]))
                and np.all((left[inner] < n) & (right[inner] < n))
                and np.all((features >= 0) & (features < min(estimator.n_features, n_features or np.inf)))):
            return "a decision tree's nodes point outside the tree"
        return None
    if isinstance(estimator, (KDTree, BallTree)):
        state = estimator.__getstate__()  # data, idx_array, node_data, node_bounds, leaf_size, n_levels, n_nodes, ...
        data, idx_array, node_data, node_bounds, n_nodes = state[0], state[1], state[2], state[3], state[6]
        inner = np.flatnonzero(node_data["is_leaf"] == 0)
        if not (data.ndim == 2 and len(idx_array) == len(data) and np.all((idx_array >= 0) & (idx_array < len(data)))
                and len(node_data) == n_nodes == node_bounds.shape[1] and node_bounds.shape[2] == data.shape[1]
                and np.all((node_data["idx_start"] >= 0) & (node_data["idx_start"] <= node_data["idx_end"])
                           & (node_data["idx_end"] <= len(data)))
                and np.all(2 * inner + 2 < n_nodes)):
            return "a neighbour tree's index points outside its data"
        return None
    parts = [step for _, step in getattr(estimator, "steps", [])] + list(getattr(estimator, "estimators_", []))
    parts += [getattr(estimator, name) for name in ("tree_", "_tree") if getattr(estimator, name, None) is not None]
    return next((found for found in (_broken_tree(part, n_features) for part in parts) if found), None)


def _skops_types(data: bytes) -> tuple[set[str], set[str]]:
    """Every ``module.Class`` a skops file names and every kind of node (loader) it uses, read from
    its schema: nothing is constructed."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        schema = json.loads(archive.read("schema.json"))
    types, loaders, pending = set(), set(), [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if {"__class__", "__module__", "__loader__"} & node.keys():
                types.add(f"{node.get('__module__')}.{node.get('__class__')}")
                loaders.add(str(node.get("__loader__")))
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return types, loaders


def _untrusted(names: set[str], trusted: Iterable[str]) -> list[str]:
    return sorted(names - trusted_types() - set(trusted))


def _best_estimator(estimator):
    """A fitted search's refitted best estimator, or the estimator itself."""
    if hasattr(estimator, "best_estimator_"):  # a fitted search, or one served from the fit cache
        return estimator.best_estimator_
    if hasattr(estimator, "cv_results_"):
        raise TransferkitError("a grid search without refit=True has no fitted classifier to save: "
                               "fit it with refit=True")
    return estimator


def _search_summary(estimator) -> dict:
    if not hasattr(estimator, "best_params_"):
        return {}
    return json.loads(json.dumps({"best_params": estimator.best_params_,
                                  "best_score": float(estimator.best_score_)}, default=str))
