"""imag mode: episodes on deliberately permuted ("imagined") labels inside a fine-tuning budget.

The fine-tuning epochs are split into episodes: ``normal_epochs`` on the true labels, then
``imag_epochs`` in which a freshly initialised head learns a permutation of the labels, then normal
again, and so on, always ending on a normal episode. An imag episode trains a second model that
shares the body but has its own fresh head (seeded per episode), so the normal head stays exactly
as it was; with ``train: head_and_body`` the unfrozen body learns from the imagined task too,
which is what changes the shared features.

Example:
    >>> episode_plan(10, normal_epochs=4, imag_epochs=1)
    [('finetune', 4), ('imag', 1), ('finetune', 5)]
    >>> label_mapping("swap", ["cat", "dog", "fox", "owl"], seed=0)
    array([1, 0, 3, 2])
"""

from __future__ import annotations

import numpy as np

from transferkit.errors import RecipeError, did_you_mean


def episode_plan(epochs: int, normal_epochs: int, imag_epochs: int) -> list[tuple[str, int]]:
    """``[(kind, epochs), ...]`` covering exactly ``epochs``: normal and imag episodes alternating.

    An imag episode is only started when at least one normal epoch fits after it, so the plan
    always ends on a normal ("finetune") episode; left-over epochs lengthen the last one.
    """
    if epochs <= 0:
        return []
    plan: list[tuple[str, int]] = []
    remaining = epochs
    while remaining > 0:
        normal = min(normal_epochs, remaining)
        plan.append(("finetune", normal))
        remaining -= normal
        if remaining > imag_epochs:
            plan.append(("imag", imag_epochs))
            remaining -= imag_epochs
        elif remaining:
            plan[-1] = ("finetune", plan[-1][1] + remaining)
            remaining = 0
    return plan


def label_mapping(mapping, class_names: list[str], seed: int) -> np.ndarray:
    """The imagined label of each class, as an index array ``imagined = result[true]``.

    Args:
        mapping: ``"derangement"`` (a seeded random permutation with no class left in place),
            ``"swap"`` (classes 0<->1, 2<->3, ...; with an odd count the last three rotate), or a
            dict by class names ``{deer: cat, ship: truck}`` (classes not named keep their label).
        class_names: the classes, in label order.
        seed: seeds the derangement; give each episode its own.

    Raises:
        RecipeError: fewer than two classes, or a dict naming an unknown class.
    """
    n = len(class_names)
    if n < 2:
        raise RecipeError("needs at least two classes to permute", key="mapping")
    if mapping == "derangement":
        rng = np.random.default_rng(seed)
        while True:
            permutation = rng.permutation(n)
            if not np.any(permutation == np.arange(n)):
                return permutation
    if mapping == "swap":
        result = np.arange(n)
        for i in range(0, n - 1, 2):
            result[i], result[i + 1] = i + 1, i
        if n % 2:  # rotate the last three so that no class keeps its label
            result[n - 3:] = [n - 2, n - 1, n - 3]
        return result
    if isinstance(mapping, dict):
        result = np.arange(n)
        for source, target in mapping.items():
            result[_class_index(source, class_names)] = _class_index(target, class_names)
        return result
    raise RecipeError(f"expected derangement, swap or {{class: class}}, got {mapping!r}", key="mapping")


def _class_index(name, class_names: list[str]) -> int:
    if str(name) in class_names:
        return class_names.index(str(name))
    guess = did_you_mean(name, class_names)
    hint = f": {guess}" if guess else f" (classes: {', '.join(class_names)})"
    raise RecipeError(f"unknown class {name!r}{hint}", key="mapping")
