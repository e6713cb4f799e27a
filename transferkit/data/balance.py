"""Imbalanced data: class weights (``balanced`` or ``{class name: weight}``) and balanced sampling.

:func:`class_weights` turns the setting into a weight vector computed on the training labels
(``balanced`` is scikit-learn's ``compute_class_weight``: ``n_samples / (n_classes * count)``);
:func:`balanced_order` draws an epoch of balanced sampling (``data.sampling: balanced``);
:func:`check_class_weight` refuses what cannot work before any image is read; :func:`label_weights`
carries the weights over to other training targets (imag episodes' permuted labels) and
:func:`sample_weights` gives each sample of a batch its weight. Nothing here imports TensorFlow or Keras.

Example:
    >>> class_weights("balanced", np.array([0, 0, 0, 1]), ["normal", "pneumonia"])
    array([0.66666667, 2.        ])
"""

from __future__ import annotations

import math

import numpy as np

from transferkit.data.seeds import ORDER, draw_seeds
from transferkit.errors import RecipeError, did_you_mean

#: The setting that weighs every class inversely to its share of the training images.
BALANCED = "balanced"


def check_class_weight(class_weight, class_names: list[str] | None = None) -> None:
    """Refuse a setting that is not ``balanced``, ``None`` or ``{class: number > 0}``; with
    ``class_names``, also a key that names no class (a class name, or an integer class index).

    Raises:
        RecipeError: ``unknown class 'normla': did you mean normal?``; a bad weight keyed by its class.
    """
    if class_weight is None or class_weight == BALANCED:
        return
    if not isinstance(class_weight, dict):
        raise RecipeError(f"expected balanced or {{class name: weight}}, got {class_weight!r}")
    for key, weight in class_weight.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            raise RecipeError(f"expected a weight > 0, got {weight!r}", key=str(key))
        if class_names is not None:
            _class_index(key, class_names)


def check_sampling(sampling: str, class_weight) -> None:
    """Refuse balanced sampling with balanced weights: together they correct twice."""
    if sampling == BALANCED and class_weight == BALANCED:
        raise RecipeError("balanced sampling and balanced class weights each balance the classes, together they "
                          "over-correct: give data.sampling: balanced or data.class_weight: balanced, not both",
                          key="data.sampling")


def class_weights(class_weight, labels: np.ndarray, class_names: list[str],
                  sampling: str = "shuffle") -> np.ndarray | None:
    """One weight per class (float64, in ``class_names`` order), or None without a setting.

    Args:
        class_weight: ``"balanced"`` (computed on ``labels``), ``{class: weight}`` (classes left
            out weigh 1; a key is a class name, or an integer class index), or None.
        labels: the training images' class indices.
        class_names: the classes.
        sampling: ``"balanced"`` for a fit that sees every sample once and so cannot sample
            (extract's classifier, the linear probe): the weights then include balanced ones, what
            balanced sampling gives in expectation.
    """
    check_class_weight(class_weight, class_names)
    counts = np.bincount(np.asarray(labels), minlength=len(class_names)).astype(np.float64)
    balanced = len(labels) / (len(class_names) * np.maximum(counts, 1))
    if class_weight is None:
        return balanced if sampling == BALANCED else None
    if class_weight == BALANCED:
        return balanced
    weights = np.ones(len(class_names))
    for key, weight in class_weight.items():
        weights[_class_index(key, class_names)] = float(weight)
    return weights * balanced if sampling == BALANCED else weights


def balanced_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The images of training epoch ``epoch`` under balanced sampling: as many draws as images, with
    replacement, each class present equally likely and each image within its class; a function of
    ``(seed, epoch)`` alone, as :func:`transferkit.data.seeds.epoch_order` is."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    chance = 1.0 / (np.count_nonzero(counts) * counts[labels])
    rng = np.random.default_rng(draw_seeds(seed, ORDER, epoch)[0])
    return rng.choice(len(labels), size=len(labels), replace=True, p=chance / chance.sum())


def label_weights(weights: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The weight of each training target when images of class ``labels`` learn ``targets`` instead:
    the mean class weight of the images that carry it. With ``targets`` a permutation of the classes
    each target gets its source class's weight; targets no image carries weigh 1."""
    total = np.bincount(targets, weights=weights[labels], minlength=len(weights))
    count = np.bincount(targets, minlength=len(weights))
    return np.divide(total, count, out=np.ones(len(weights)), where=count > 0)


def sample_weights(labels: np.ndarray, class_weight: np.ndarray) -> np.ndarray:
    """float32 ``[B]``: each sample's weight, from integer labels ``[B]`` or (soft) one-hot labels
    ``[B, C]``. A soft label weighs its classes' weights times their shares, so a MixUp or CutMix
    pair weighs as its labels mix; label smoothing, applied inside the loss, leaves it as it is."""
    labels = np.asarray(labels)
    return (labels @ class_weight if labels.ndim == 2 else class_weight[labels]).astype(np.float32)


def _class_index(key, class_names: list[str]) -> int:
    """The index of the class ``key`` names: a class name, or else an integer index (as scikit-learn's
    class_weight keys are)."""
    if str(key) in class_names:
        return class_names.index(str(key))
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(class_names):
        return key
    hint = did_you_mean(key, class_names, f"the classes are {', '.join(class_names)}")
    raise RecipeError(f"unknown class {key!r}: {hint}")
