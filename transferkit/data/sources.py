"""Where images come from: a data source resolved to a folder, and the image sets found in it.

:func:`resolve_source` turns a path or ``builtin:<name>`` into a folder (built-in datasets are written
once under ``$TRANSFERKIT_HOME``); :class:`ImageSet` and :class:`Splits` hold the files and labels that
:mod:`transferkit.data.folders` finds in a folder, :mod:`transferkit.data.labels` reads from a labels CSV
and :mod:`transferkit.data.splits` divides. Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.errors import DataError
from transferkit.io import transferkit_home

#: A data source written ``builtin:<name>`` is one of :data:`BUILTINS`, not a path.
BUILTIN_PREFIX = "builtin:"
#: class names :meth:`Splits.describe` shows; the rest are counted
SHOWN_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Image files with integer labels, as found in a class-per-folder directory or a labels CSV.

    Attributes:
        paths: absolute file paths, sorted by class then file name.
        labels: int64 indices into ``class_names``, one per path.
        class_names: the sorted class folder names (a labels CSV's sorted distinct labels).
        root: the folder the images came from, or the labels CSV that lists them.
        skipped: ``(path, reason)`` of the files in ``root`` that were skipped (the whole folder's, also
            in a subset: :attr:`Splits.skipped` lists a split's once); a labels CSV's skipped rows as
            ``("<csv>:<line>", reason)``.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    root: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def folder(self) -> str:
        """The folder the paths lie in: ``root``, or the folder of the labels CSV that ``root`` names."""
        return self.root if os.path.isdir(self.root) else os.path.dirname(self.root)

    @property
    def where(self) -> str:
        """``root`` as messages show it: ``photos/`` for a folder, ``labels.csv`` for a labels CSV."""
        return f"{self.root.rstrip('/')}/" if self.folder == self.root else self.root

    def subset(self, indices) -> "ImageSet":
        """The images at ``indices`` (in that order), with the same classes, root and skipped files."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet([self.paths[i] for i in indices], self.labels[indices], list(self.class_names),
                        self.root, list(self.skipped))

    def copy_to(self, root: str | Path) -> Path:
        """The images copied into a class-per-folder tree under ``root`` (a dataset of its own)."""
        return self._write_tree(root, shutil.copyfile)

    def link_to(self, root: str | Path) -> Path:
        """The images as a class-per-folder tree of symbolic links under ``root``.

        The links point outside ``root``: scan it with ``follow_links=True`` (``data.follow_links: true``).
        """
        return self._write_tree(root, os.symlink)

    def _write_tree(self, root, put) -> Path:
        """``put(image, place)`` each image at ``root/<class>/<its path below its class folder>`` (below a
        labels CSV's folder)."""
        root, in_class_folders = Path(root), self.folder == self.root
        for path, label in zip(self.paths, self.labels):
            relative = Path(os.path.relpath(path, self.folder)).parts
            if ".." in relative:
                relative = relative[-1:]
            elif in_class_folders and len(relative) > 1:
                relative = relative[1:]
            target = root.joinpath(self.class_names[label], *relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            put(os.path.abspath(path), target)
        return root

    def class_counts(self) -> dict[str, int]:
        """Number of images per class, for every class in ``class_names`` (0 where absent)."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist()))


@dataclass
class Splits:
    """Train / validation / test image sets sharing one list of classes."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """The ``(path, reason)`` of every file skipped in the train, val and test folders, each once."""
        reasons = {}
        for part in (self.train, self.val, self.test):
            for path, reason in part.skipped if part is not None else ():
                reasons.setdefault(path, reason)
        return list(reasons.items())

    def describe(self) -> str:
        """``"2 classes; images: train 18, val 6; 3 files skipped (listed above); classes: cat, dog"``
        (the first :data:`SHOWN_CLASSES` class names)."""
        counts = ", ".join(f"{name} {len(part)}" for name, part in
                           (("train", self.train), ("val", self.val), ("test", self.test)) if part is not None)
        skipped = f"; {len(self.skipped)} files skipped (listed above)" if self.skipped else ""
        names = self.class_names[:SHOWN_CLASSES]
        more = f" and {len(self.class_names) - len(names)} more" if len(self.class_names) > len(names) else ""
        return f"{len(self.class_names)} classes; images: {counts}{skipped}; classes: {', '.join(names)}{more}"


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def resolve_source(source: str | Path) -> Path:
    """The folder behind a data source: a path, or ``builtin:<name>`` materialised once on disk.

    Built-in datasets are written as class-per-folder PNGs under ``$TRANSFERKIT_HOME`` (default
    ``~/.cache/transferkit``) in ``builtin/<name>/``, atomically, and reused afterwards.

    Args:
        source: a folder path, or ``"builtin:digits"``.

    Returns:
        The folder path.
    """
    text = str(source)
    if not text.startswith(BUILTIN_PREFIX):
        return require_folder(source)
    name = text[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        available = ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
        raise DataError(f"unknown built-in dataset {text!r}: available are {available}")
    folder = transferkit_home() / "builtin" / name
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
        try:
            BUILTINS[name](tmp)
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not just another process finishing first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_digits(folder: Path) -> None:
    """Write scikit-learn's digits as ``<class>/<index>.png`` (8x8 grayscale, 0..16 -> 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        (folder / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / str(label) / f"{i:04d}.png")


#: built-in dataset name -> function writing it as class-per-folder images into a folder
BUILTINS = {"digits": _write_digits}


def require_folder(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path`; DataError if it is not an existing folder."""
    path = Path(path)
    if not path.is_dir():
        problem = "not a folder (nor a .csv labels file)" if path.exists() else "folder not found"
        raise DataError(f"{problem}: {path} (paths in a recipe are relative to the recipe's folder)")
    return path
