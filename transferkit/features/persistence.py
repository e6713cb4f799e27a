"""Fitted scikit-learn classifiers saved without pickle, and opened without running code.

One of two formats, by what the classifier is:

- ``<stem>.npz``: a linear classifier (``LogisticRegression`` or ``LinearSVC``, alone or after
  ``StandardScaler`` steps in a ``Pipeline``) as plain arrays, with its parameters and small
  metadata as JSON text in the same file. It is read with ``allow_pickle=False`` and rebuilt from
  these three classes only, so it predicts exactly as before saving.
- ``<stem>.skops``: any other estimator, through ``skops.io``. It is opened only when every type the
  file names is one of :func:`~transferkit.features.skops_format.trusted_types` (transferkit's own
  classifiers and what they hold) or one the caller trusts by name (see
  :mod:`transferkit.features.skops_format`).

A fitted ``GridSearchCV`` is saved as its best estimator; ``best_params_`` and ``best_score_``
travel along as metadata. Anything else is refused with a one-line :class:`TransferkitError`.

Example:
    >>> path = save_classifier(search, "runs/flowers/model/classifier")   # .../classifier.npz
    >>> model, search_summary = load_classifier(path)                  # Pipeline, {"best_params": ...}
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.features.skops_format import load_skops, skops_bytes
from transferkit.io import atomic_path

FORMAT = "transferkit.classifier"
VERSION = 1
SUFFIXES = (".npz", ".skops")  # the formats, in the order they are looked for
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
        data = skops_bytes(best, json.dumps(metadata), path, only_trusted=only_trusted)
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
            :func:`~transferkit.features.skops_format.trusted_types`, for a ``.skops`` file whose
            source you trust.

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
            estimator, metadata_text = load_skops(path, tuple(trusted))
            metadata = _metadata(metadata_text, path)
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
    from transferkit.features.classifiers import cv_scores

    return json.loads(json.dumps({"best_params": estimator.best_params_, "best_score": float(estimator.best_score_),
                                  "cv": cv_scores(estimator)}, default=str))
