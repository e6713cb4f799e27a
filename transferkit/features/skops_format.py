"""Classifiers in ``.skops`` files, opened without running code.

A file is opened only when every type it names is one of :func:`trusted_types` (transferkit's own
classifiers and what they hold) or one the caller trusts by name, and it uses only the kinds of
skops node a classifier needs: both read from the file's schema before anything is constructed.
The index arrays of its trees, which compiled code follows unchecked, are checked before the
estimator is returned.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from transferkit.errors import TransferkitError

log = logging.getLogger("transferkit")

# the kinds of skops node a classifier needs: containers, JSON values, arrays, estimators, trees
_SKOPS_LOADERS = frozenset({"DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode", "NdArrayNode",
                            "ObjectNode", "TreeNode"})


def skops_bytes(estimator, metadata: str, path: Path, *, only_trusted: bool) -> bytes:
    """``estimator`` and its JSON ``metadata`` as the bytes of a skops file to be written at ``path``.

    Raises:
        TransferkitError: skops cannot write the estimator, or (``only_trusted``) the file would
            hold types that are not trusted (else a warning says so).
    """
    import skops.io

    try:
        data = skops.io.dumps({"estimator": estimator, "metadata": metadata})
    except Exception as error:  # noqa: BLE001 - whatever skops cannot write, in one line
        raise TransferkitError(f"cannot save a {type(estimator).__name__} without pickle "
                               f"({type(error).__name__}: {error}): use one of transferkit's classifiers "
                               f"(logistic_regression, linear_svm, knn, random_forest)") from None
    untrusted = _untrusted(_skops_types(data)[0], ())
    if untrusted and only_trusted:
        raise TransferkitError(f"{path}: not written: it would hold types transferkit does not open "
                               f"({', '.join(untrusted)})")
    if untrusted:
        log.warning("%s holds types transferkit does not open by default (%s): loading it needs "
                    "trusted=%r", path, ", ".join(untrusted), untrusted)
    return data


def load_skops(path: Path, trusted: tuple[str, ...]) -> tuple[object, str]:
    """The estimator in a skops file and its metadata text, once every check has passed."""
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
    return saved["estimator"], saved["metadata"]


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

