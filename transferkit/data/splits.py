"""Train / validation / test image sets: stratified fractions of the training data, folders or labels files of
their own, or the fixed splits of a labels file's split column.

:func:`load_splits` resolves and scans each source (:func:`scan_source`: a class-per-folder directory,
``builtin:NAME`` or a labels CSV), refuses sources that share a file (an image on both sides of a split), and
holds out fractions with :func:`stratified_split` (the split of scikit-learn's ``train_test_split``). Nothing
here imports TensorFlow or Keras.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from transferkit.data.folders import file_identities, scan_folder
from transferkit.data.labels import SPLIT_NAMES, is_labels_file, read_labels
from transferkit.data.sources import ImageSet, Splits, resolve_source
from transferkit.errors import DataError


def stratified_split(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out ``fraction`` of the images, keeping class proportions.

    The same split as ``sklearn.model_selection.train_test_split(range(n), test_size=fraction,
    stratify=labels, random_state=seed)``; each part keeps the images in file order.

    Args:
        images: the images to split.
        fraction: the share to hold out, in (0, 1), or a number of images.
        seed: the random state.

    Returns:
        ``(kept, held_out)``.
    """
    from sklearn.model_selection import train_test_split

    counts = {name: count for name, count in images.class_counts().items() if count}
    smallest = min(counts, key=counts.get)
    if counts[smallest] < 2:
        raise DataError(f"cannot split {fraction:g} of {images.where} by class: class {smallest!r} has "
                        f"{counts[smallest]} image(s), each class needs at least 2: add images or give a folder")
    try:
        kept, held_out = train_test_split(np.arange(len(images)), test_size=fraction,
                                          stratify=images.labels, random_state=seed)
    except ValueError as err:
        raise DataError(f"cannot split {fraction:g} of the {len(images)} images in {images.where} by class "
                        f"({err}): hold out at least one image of each of the {len(counts)} classes and keep "
                        "at least one, or give a folder") from None
    return images.subset(np.sort(kept)), images.subset(np.sort(held_out))


def load_splits(train: str | Path, val: float | str | Path | None = 0.2,
                test: float | str | Path | None = None, seed: int = 0, follow_links: bool = False,
                screen: bool = True) -> Splits:
    """Train / val / test image sets from a folder, ``builtin:...`` or labels CSV, and fractions or sources.

    Fractions are of the whole training data: with ``val=0.2, test=0.1`` on 500 images, test gets
    50 and val 100 (test is split off first, then val from the rest), train keeps 350. Sources are
    scanned by :func:`scan_source`; sources that share a file (the same folder twice, or links from one
    into the other) are refused, so no image is on both sides of a split. A labels CSV with a split
    column fixes all three splits itself: ``val`` and ``test`` must then be None.

    Args:
        train: class-per-folder images, a labels CSV (``path,label[,split]``), or ``"builtin:digits"``.
        val: a stratified fraction in (0, 1), a folder or labels CSV with the same classes, or None.
        test: like ``val``.
        seed: random state of the splits.
        follow_links: also use files outside each folder, or outside a labels CSV's folder (``data.follow_links``).
        screen: decode every file to catch bad ones; False only lists the files (as
            ``transferkit validate`` does: nothing is read).

    Returns:
        :class:`Splits`; ``Splits.skipped`` lists every skipped file once.
    """
    given = {"test": test, "val": val}  # test first: val is then split from what remains
    fractions = {key: value for key, value in given.items() if _is_fraction(key, value)}
    if sum(fractions.values()) >= 1:
        raise DataError(f"data.val + data.test = {sum(fractions.values()):g} leaves no training images: "
                        "make their sum less than 1")
    train_set, fixed = _scan("train", train, follow_links=follow_links, screen=screen)
    if fixed is not None:
        return _fixed_splits(train_set, fixed, given)
    parts = {key: None if value is None else _scan(key, value, train_set.class_names, follow_links, screen)[0]
             for key, value in given.items() if key not in fractions}
    _refuse_shared_files({"train": train_set, **parts})
    total = len(train_set)
    for key, fraction in fractions.items():  # counts of the whole, rounded up like scikit-learn
        try:
            train_set, parts[key] = stratified_split(train_set, math.ceil(fraction * total), seed)
        except DataError as err:
            raise DataError(f"data.{key}: {err}") from None
    return Splits(train_set, parts["val"], parts["test"])


def scan_source(source: str | Path, class_names: list[str] | None = None, *, screen: bool = True,
                follow_links: bool = False, test_rows: bool = True) -> ImageSet:
    """The images of one data source: a class-per-folder directory (:func:`scan_folder`), ``builtin:NAME``,
    or a labels CSV (:func:`~transferkit.data.labels.read_labels`; ``test_rows=False`` leaves out the
    rows its split column marks test, so that a held-out test split is not looked at)."""
    images, fixed = _scan("data", source, class_names, follow_links, screen, prefix=False)
    if fixed is not None and not test_rows:
        images = images.subset(np.flatnonzero(fixed != "test"))
    return images


def _is_fraction(key: str, value) -> bool:
    """True for a number in (0, 1); False for a folder or None; DataError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value < 1:
            return True
        raise DataError(f"data.{key}: {value!r} is not a fraction in (0, 1): give e.g. 0.2, a folder, or null")
    if value is None or isinstance(value, (str, Path)):
        return False
    raise DataError(f"data.{key}: expected a fraction in (0, 1), a folder or null, got {value!r}")


def _scan(key: str, source, class_names=None, follow_links: bool = False, screen: bool = True,
          prefix: bool = True) -> tuple[ImageSet, np.ndarray | None]:
    """The images of ``source`` and, for a labels CSV with a split column, each one's split; errors are
    prefixed by the recipe key ``data.<key>`` (unless not ``prefix``)."""
    try:
        if not is_labels_file(source):
            return scan_folder(resolve_source(source), class_names, screen=screen, follow_links=follow_links), None
        images, fixed = read_labels(source, class_names, screen=screen, follow_links=follow_links)
        if fixed is not None and key in ("val", "test"):
            raise DataError(f"{source} has a split column, which only data.train may have: give it as data.train "
                            "(its val and test rows are used), or drop the column")
        return images, fixed
    except DataError as err:
        raise DataError(f"data.{key}: {err}" if prefix else str(err)) from None


def _fixed_splits(images: ImageSet, fixed: np.ndarray, given: dict) -> Splits:
    """The splits a labels CSV's split column gives, with data.val and data.test null."""
    for key, value in given.items():
        if value is not None:
            raise DataError(f"data.{key}: {images.root} has a split column, which fixes the {key} images: "
                            f"set data.{key} to null (Python: {key}=None), or drop the column")
    parts = {name: images.subset(np.flatnonzero(fixed == name)) for name in SPLIT_NAMES}
    empty = [name for name, count in parts["train"].class_counts().items() if not count]
    if empty:
        raise DataError(f"data.train: class {empty[0]!r} has no rows with split train in {images.root}: "
                        "give it training images or remove its rows")
    return Splits(parts["train"], parts["val"] or None, parts["test"] or None)


def _refuse_shared_files(parts: dict[str, ImageSet | None]) -> None:
    """DataError when two split folders hold the same real file (an image on both sides of the split)."""
    owner = {}
    for key, images in parts.items():
        shared = []
        paths = images.paths if images is not None else []
        for path, identity in zip(paths, file_identities(paths)):
            first = owner.setdefault(identity, (key, path))
            if first[0] != key:
                shared.append((path, first))
        if shared:
            path, (other, other_path) = shared[0]
            raise DataError(f"data.{key}: {len(shared)} image(s) of {images.where} are also in data.{other} "
                            f"(e.g. {path} is {other_path}): give folders that share no files, or a fraction")
