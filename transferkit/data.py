"""Class-per-folder images in, batches of raw RGB pixels out.

Discovery (:func:`scan_folder`), bad-file screening, stratified splits (:func:`load_splits`),
built-in datasets (:func:`resolve_source`) and Pillow decoding (:func:`load_image`). Images leave
this module as uint8 RGB; :mod:`transferkit.pipelines` batches them for Keras, and the backbone
model does its own preprocessing.

Problems with a file (unreadable, truncated, not an image) are never fatal: the file is skipped and
one ``UserWarning`` per folder lists every skipped file with its reason. Problems with a folder
(missing, no classes, an empty class, one class) raise :class:`~transferkit.errors.DataError`.

Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transferkit.errors import DataError
from transferkit.io import transferkit_home

BUILTIN_PREFIX = "builtin:"


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Image files with integer labels, as found in a class-per-folder directory.

    Attributes:
        paths: absolute file paths, sorted by class then file name.
        labels: int64 indices into ``class_names``, one per path.
        class_names: the sorted class folder names.
        root: the folder the images came from.
        skipped: ``(path, reason)`` of the files in ``root`` that could not be read.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    root: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> "ImageSet":
        """The images at ``indices`` (in that order), with the same classes, root and skipped files."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet([self.paths[i] for i in indices], self.labels[indices], list(self.class_names),
                        self.root, list(self.skipped))

    def link_to(self, root: str | Path) -> Path:
        """The images as a class-per-folder tree of symbolic links under ``root`` (a dataset of its own)."""
        root = Path(root)
        for path, label in zip(self.paths, self.labels):
            target = root / self.class_names[label] / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
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


# --------------------------------------------------------------------------------------------
# Sources and discovery
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
        return _require_folder(source)
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


def _require_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        problem = "not a folder" if path.exists() else "folder not found"
        raise DataError(f"{problem}: {path} (paths in a recipe are relative to the recipe's folder)")
    return path


def scan_folder(root: str | Path, class_names: list[str] | None = None, screen: bool = True) -> ImageSet:
    """Find the images of a class-per-folder directory (``root/<class>/**/<image>``).

    Hidden files and folders (names starting with ``.``) and files directly in ``root`` are ignored.
    Files that cannot be used are skipped and listed in one warning: with ``screen=True`` every file
    is decoded once (in a thread pool) and unreadable, truncated or non-image files are skipped;
    with ``screen=False`` only files without an image extension are.

    Args:
        root: the folder.
        class_names: the classes of the training folder, when scanning a separate val/test folder:
            the folder's classes must be among them and labels index into this list.
        screen: decode every file to catch bad ones (slower, safe).

    Returns:
        An :class:`ImageSet`.
    """
    root = _require_folder(root)
    shown = f"{str(root).rstrip('/')}/"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {shown}: expected one sub-folder per class, each holding its images")
    if class_names is None:
        if len(folders) == 1:
            raise DataError(f"only one class ({folders[0]!r}) in {shown}: a classifier needs at least two")
        class_names = folders
    else:
        class_names = list(class_names)
        unknown = [name for name in folders if name not in class_names]
        if unknown:
            raise DataError(f"class {unknown[0]!r} in {shown} is not among the training classes "
                            f"({', '.join(class_names)}): rename or remove the folder")

    candidates = [(path, name) for name in folders for path in _files_under(root / name)]
    good, skipped = screen_files([path for path, _ in candidates], decode=screen, shown_root=root)
    good = set(good)
    kept = [(path, name) for path, name in candidates if path in good]
    present = {name for _, name in kept}
    empty = [name for name in folders if name not in present]
    if empty:
        which = ", ".join(repr(n) for n in empty)
        raise DataError(f"class{'es' * (len(empty) > 1)} {which} in {shown} "
                        f"{'have' if len(empty) > 1 else 'has'} no readable images: add images or remove the folder")
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[name] for _, name in kept], dtype=np.int64)
    return ImageSet([path for path, _ in kept], labels, class_names, os.path.abspath(root), skipped)


def screen_files(paths: list[str], decode: bool = True, shown_root=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Split files into usable images and skipped ``(path, reason)`` pairs; one warning lists the skipped.

    Args:
        paths: image file paths.
        decode: decode every file (in a thread pool) to catch corrupt and truncated ones;
            False only checks for an image extension.
        shown_root: folder that the warning shows paths relative to.

    Returns:
        ``(good paths in the given order, skipped)``.
    """
    check = _decode_problem if decode else _extension_problem
    with ThreadPoolExecutor() as pool:
        problems = list(pool.map(check, paths))
    good = [path for path, problem in zip(paths, problems) if problem is None]
    skipped = [(path, problem) for path, problem in zip(paths, problems) if problem is not None]
    if skipped:
        where = f" in {str(shown_root).rstrip('/')}/" if shown_root else ""
        listing = ", ".join(f"{os.path.relpath(path, shown_root) if shown_root else path} ({reason})"
                            for path, reason in skipped)
        warnings.warn(f"skipped {len(skipped)} unreadable file{'s' * (len(skipped) > 1)}{where}: {listing}",
                      stacklevel=3)
    return good, skipped


def find_images(inputs) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named in ``inputs`` or found below the folders among them, screened.

    Returns:
        ``(usable image paths, skipped (path, reason) pairs)``; the skipped are listed in one warning.

    Raises:
        DataError: an input does not exist.
    """
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += _files_under(item)
        elif item.is_file():
            paths.append(str(item.resolve()))
        else:
            raise DataError(f"{item}: no such file or folder")
    return screen_files(paths)


def _files_under(folder: Path) -> list[str]:
    """Absolute paths of the non-hidden files below ``folder``, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.abspath(folder), followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded into an RGB image, or None if it can."""
    try:
        _open_rgb(path, draft_size=1)  # draft: JPEGs decode at 1/8 scale but still read every byte
    except Image.UnidentifiedImageError:
        return "not an image"
    except OSError as err:
        return "truncated image" if "truncated" in str(err) else f"unreadable: {err}"
    except Exception as err:  # a broken header, EXIF block or palette: any decoder error
        return f"unreadable: {type(err).__name__}: {err}"
    return None


def _extension_problem(path: str) -> str | None:
    return None if Path(path).suffix.lower() in Image.registered_extensions() else "not an image extension"


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

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
        raise DataError(f"cannot split {fraction:g} of {images.root}/ by class: class {smallest!r} has "
                        f"{counts[smallest]} image(s), each class needs at least 2: add images or give a folder")
    try:
        kept, held_out = train_test_split(np.arange(len(images)), test_size=fraction,
                                          stratify=images.labels, random_state=seed)
    except ValueError as err:
        raise DataError(f"cannot split {fraction:g} of the {len(images)} images in {images.root}/ "
                        f"by class: {err}") from None
    return images.subset(np.sort(kept)), images.subset(np.sort(held_out))


def load_splits(train: str | Path, val: float | str | Path | None = 0.2,
                test: float | str | Path | None = None, seed: int = 0) -> Splits:
    """Train / val / test image sets from a folder (or ``builtin:...``) and fractions or folders.

    Fractions are of the whole train folder: with ``val=0.2, test=0.1`` on 500 images, test gets
    50 and val 100 (test is split off first, then val from the rest), train keeps 350.

    Args:
        train: class-per-folder images, or ``"builtin:digits"``.
        val: a stratified fraction in (0, 1), a folder with the same classes, or None.
        test: like ``val``.
        seed: random state of the splits.

    Returns:
        :class:`Splits`.
    """
    given = {"test": test, "val": val}  # test first: val is then split from what remains
    fractions = {key: value for key, value in given.items() if _is_fraction(key, value)}
    if sum(fractions.values()) >= 1:
        raise DataError(f"data.val + data.test = {sum(fractions.values()):g} leaves no training images: "
                        "make their sum less than 1")
    train_set = _scan_source("train", train)
    parts = {key: None if value is None else _scan_source(key, value, train_set.class_names)
             for key, value in given.items() if key not in fractions}
    total = len(train_set)
    for key, fraction in fractions.items():  # counts of the whole, rounded up like scikit-learn
        train_set, parts[key] = stratified_split(train_set, math.ceil(fraction * total), seed)
    return Splits(train_set, parts["val"], parts["test"])


def _is_fraction(key: str, value) -> bool:
    """True for a number in (0, 1); False for a folder or None; DataError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value < 1:
            return True
        raise DataError(f"data.{key}: {value!r} is not a fraction in (0, 1): give e.g. 0.2, a folder, or null")
    if value is None or isinstance(value, (str, Path)):
        return False
    raise DataError(f"data.{key}: expected a fraction in (0, 1), a folder or null, got {value!r}")


def _scan_source(key: str, source, class_names=None) -> ImageSet:
    """scan_folder(resolve_source(source)), with errors prefixed by the recipe key."""
    try:
        return scan_folder(resolve_source(source), class_names)
    except DataError as err:
        raise DataError(f"data.{key}: {err}") from None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode an image file with Pillow into RGB pixels.

    Any mode becomes RGB: grayscale and palette images are replicated, transparency is composited
    onto white, 16/32-bit and float images are scaled to 0..255 (see :func:`_to_rgb`). The EXIF
    orientation is applied; the image is resized to a square with bilinear filtering (aspect ratio
    not kept, like ``keras.utils.image_dataset_from_directory``).

    Args:
        path: the image file.
        image_size: side of the square output.

    Returns:
        uint8 array of shape ``(image_size, image_size, 3)``.
    """
    image = _open_rgb(path, draft_size=image_size)
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))


def load_images(paths, image_size: int, workers: int | None = None) -> np.ndarray:
    """Decode many images in a thread pool (Pillow releases the GIL).

    Args:
        paths: image files.
        image_size: side of the square output.
        workers: threads; None: one per CPU core (Pillow holds the GIL for part of each image,
            so more threads than cores only contend for it).

    Returns:
        uint8 array of shape ``(len(paths), image_size, image_size, 3)``.
    """
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        images = list(pool.map(lambda p: load_image(p, image_size), paths))
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)


def _open_rgb(path: str | Path, draft_size: int) -> Image.Image:
    """Open, fully decode and orient an image, as RGB.

    ``draft_size`` lets JPEG decoding shrink by up to 8x while staying at least that large.
    """
    with Image.open(path) as image:
        image.draft(image.mode, (draft_size, draft_size))  # no-op for other formats than JPEG
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels become white."""
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map high bit-depth pixels linearly from their value range to 0..255 (no saturation)."""
    low, high = _value_range(pixels, mode)
    return np.round((pixels.astype(np.float64) - low) * (255 / (high - low))).clip(0, 255).astype(np.uint8)


def _value_range(pixels: np.ndarray, mode: str) -> tuple[float, float]:
    """The type's range for 16-bit modes (0..65535).

    For ``I`` (32-bit integers, which Pillow also uses for some 16-bit files) and ``F`` (float):
    the smallest of 0..1 (float only), 0..255 and 0..65535 that holds the values, else the image's
    own minimum..maximum.
    """
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = float(pixels.min()), float(pixels.max())
    for limit in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if low >= 0 and high <= limit:
            return 0.0, limit
    return low, max(high, low + 1)
