"""Class-per-folder images in, batches of raw RGB pixels out.

Discovery (:func:`scan_folder`), bad-file screening, stratified splits (:func:`load_splits`),
built-in datasets (:func:`resolve_source`), Pillow decoding (:func:`load_image`) and resizing
(:func:`resize`). Images leave this module as uint8 RGB; :mod:`transferkit.data.pipelines` batches them
for Keras, and the backbone model does its own preprocessing.

Problems with a file (unreadable, truncated, not an image, not a regular file, a link that is not
followed, a second path to a file already found) are never fatal: the file is skipped and one
``UserWarning`` per folder lists every skipped file with its reason. Problems with a folder (missing,
no classes, an empty class, one class) raise :class:`~transferkit.errors.DataError`.

Scanning cannot be fooled by links or special files: links to folders are never followed (so no link
loop), links to files are followed only inside the data folder unless ``follow_links=True``, every
real file is kept once, and FIFOs, sockets and devices are never opened.

Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transferkit.errors import DataError
from transferkit.io import transferkit_home
from transferkit.recipe import BUILTIN_PREFIX


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
        skipped: ``(path, reason)`` of the files in ``root`` that were skipped (the whole folder's, also
            in a subset: :attr:`Splits.skipped` lists a split's once).
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

    def copy_to(self, root: str | Path) -> Path:
        """The images copied into a class-per-folder tree under ``root`` (a dataset of its own)."""
        return self._write_tree(root, shutil.copyfile)

    def link_to(self, root: str | Path) -> Path:
        """The images as a class-per-folder tree of symbolic links under ``root``.

        The links point outside ``root``: scan it with ``follow_links=True`` (``data.follow_links: true``).
        """
        return self._write_tree(root, os.symlink)

    def _write_tree(self, root, put) -> Path:
        """``put(image, place)`` each image at ``root/<class>/<its path below its class folder>``."""
        root = Path(root)
        for path, label in zip(self.paths, self.labels):
            relative = Path(os.path.relpath(path, self.root)).parts
            below_class = relative[1:] if len(relative) > 1 and ".." not in relative else relative[-1:]
            target = root.joinpath(self.class_names[label], *below_class)
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


#: what a skipped link to a file outside the data folder says to do
_FOLLOW_LINKS_FIX = "set data.follow_links: true (Python: follow_links=True) to use it"
#: the same, for a folder named to predict
_NAMED_FILE_FIX = "name the file itself (Python: follow_links=True) to use it"


def scan_folder(root: str | Path, class_names: list[str] | None = None, screen: bool = True,
                follow_links: bool = False) -> ImageSet:
    """Find the images of a class-per-folder directory (``root/<class>/**/<image>``).

    Hidden files and folders (names starting with ``.``) and files directly in ``root`` are ignored.
    Files that cannot be used are skipped and listed, each once, in one warning:

    - links to folders (never followed, at any depth, so a link loop cannot repeat images), broken
      links, and links to files outside ``root`` unless ``follow_links``;
    - FIFOs, sockets and devices: judged by ``stat`` and never opened, so nothing can hang;
    - a second path to a file already found (a symbolic or hard link to it, in its own class or
      another): each file is kept once, where it lies itself, else at its first link in sorted order;
    - with ``screen=True`` (every file decoded once, in a thread pool) unreadable, truncated and
      non-image files; with ``screen=False`` only files without an image extension.

    Args:
        root: the folder.
        class_names: the classes of the training folder, when scanning a separate val/test folder:
            the folder's classes must be among them and labels index into this list.
        screen: decode every file to catch bad ones (slower, safe).
        follow_links: also use links to files outside ``root`` (links to folders are never followed).

    Returns:
        An :class:`ImageSet`.
    """
    root = _require_folder(root)
    shown = f"{str(root).rstrip('/')}/"
    folders, skipped = _class_folders(root)
    not_followed = f" ({_listing(skipped, root)})" if skipped else ""
    if not folders:
        raise DataError(f"no class folders in {shown}{not_followed}: "
                        "expected one sub-folder per class, each holding its images")
    if class_names is None:
        if len(folders) == 1:
            raise DataError(f"only one class ({folders[0]!r}) in {shown}{not_followed}: "
                            "a classifier needs at least two")
        class_names = folders
    else:
        class_names = list(class_names)
        unknown = [name for name in folders if name not in class_names]
        if unknown:
            raise DataError(f"class {unknown[0]!r} in {shown} is not among the training classes "
                            f"({', '.join(class_names)}): rename or remove the folder")

    candidates = []
    for name in folders:
        files, problems = _files_under(root / name, root, follow_links)
        candidates += [(path, name) for path in files]
        skipped += problems
    unique, duplicates = _each_file_once([path for path, _ in candidates], root)
    good, bad = screen_files(unique, decode=screen, warn=False)
    skipped = sorted(skipped + duplicates + bad, key=lambda item: _relative_parts(item[0], root))
    _warn_skipped(skipped, root)
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


def screen_files(paths: list[str], decode: bool = True, shown_root=None,
                 warn: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Split files into usable images and skipped ``(path, reason)`` pairs; one warning lists the skipped.

    Anything but a regular file (a FIFO, socket or device, also behind a link) is skipped without
    being opened.

    Args:
        paths: image file paths.
        decode: decode every file (in a thread pool) to catch corrupt and truncated ones;
            False only checks for an image extension.
        shown_root: folder that the warning shows paths relative to.
        warn: emit the warning (False: the caller reports the skipped files itself).

    Returns:
        ``(good paths in the given order, skipped)``.
    """
    check = _decode_problem if decode else _extension_problem
    with ThreadPoolExecutor() as pool:
        problems = list(pool.map(check, paths))
    good = [path for path, problem in zip(paths, problems) if problem is None]
    skipped = [(path, problem) for path, problem in zip(paths, problems) if problem is not None]
    if warn:
        _warn_skipped(skipped, shown_root)
    return good, skipped


def find_images(inputs, follow_links: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named in ``inputs`` or found below the folders among them, screened.

    A file named in ``inputs`` is used as named, even a link that leads elsewhere: naming it is the
    user's choice (a FIFO, socket or device is still skipped, never opened). Below a named folder the
    rules of :func:`scan_folder` apply with that folder as the root: links to folders are not followed,
    links to files outside it only with ``follow_links``. Each real file is used once: where it lies
    itself if listed, else at its first link.

    Returns:
        ``(usable image paths, skipped (path, reason) pairs)``; the skipped are listed in one warning.

    Raises:
        DataError: an input does not exist.
    """
    paths, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files, problems = _files_under(item, item, follow_links, _NAMED_FILE_FIX)
            paths += files
            skipped += problems
        elif item.exists():  # a file, or a FIFO or device that screening skips
            paths.append(str(item.resolve()))
        else:
            raise DataError(f"{item}: no such file or folder")
    unique, duplicates = _each_file_once(list(dict.fromkeys(paths)))
    good, bad = screen_files(unique, warn=False)
    _warn_skipped(skipped + duplicates + bad, None)
    return good, skipped + duplicates + bad


def _class_folders(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The sorted non-hidden sub-folders of ``root``, and the skipped links to folders among its entries."""
    folders, skipped = [], []
    for entry in sorted(os.scandir(os.path.abspath(root)), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            folders.append(entry.name)
        elif entry.is_symlink() and os.path.isdir(entry.path):
            skipped.append((entry.path, _entry_problem(entry.path, os.path.realpath(root), False)))
    return folders, skipped


def _files_under(folder: Path, root: Path, follow_links: bool = False,
                 outside_fix: str = _FOLLOW_LINKS_FIX) -> tuple[list[str], list[tuple[str, str]]]:
    """Candidate files below ``folder`` (within the data folder ``root``) and the entries skipped there.

    Only real sub-folders are walked (a link to a folder is skipped, never entered), and no file is
    opened: each entry is judged from ``lstat``/``stat`` by :func:`_entry_problem`. Hidden names are
    ignored. Both lists hold absolute paths sorted by their path relative to ``folder``.

    Returns:
        ``(paths, [(path, reason), ...])``.
    """
    real_root = os.path.realpath(root)
    files, skipped, pending = [], [], [os.path.abspath(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = [entry for entry in listing if not entry.name.startswith(".")]
        except OSError as err:
            skipped.append((current, f"unreadable folder: {err.strerror}"))
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif problem := _entry_problem(entry.path, real_root, follow_links, outside_fix):
                skipped.append((entry.path, problem))
            else:
                files.append(entry.path)
    files.sort(key=lambda path: _relative_parts(path, folder))
    skipped.sort(key=lambda item: _relative_parts(item[0], folder))
    return files, skipped


def _entry_problem(path: str, real_root: str, follow_links: bool,
                   outside_fix: str = _FOLLOW_LINKS_FIX) -> str | None:
    """Why the folder entry ``path`` cannot be an image file of the data folder, or None. Never opens it."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(path)
            try:
                info = os.stat(path)
            except OSError as err:
                return f"broken link: {err.strerror}"
            if stat.S_ISDIR(info.st_mode):
                return f"link to the folder {real}, not followed: link its files instead, or copy it in"
            if not follow_links and os.path.commonpath([real, real_root]) != real_root:
                return f"link to {real}, outside {real_root}/: {outside_fix}"
    except OSError as err:
        return f"unreadable: {err.strerror}"
    return _not_regular(info)


def _each_file_once(paths: list[str], shown_root=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Each real file once: where it lies itself if listed, else its first link; the rest are skipped.

    Returns:
        ``(kept paths in the given order, [(path, "same file as <kept path>"), ...])``.
    """
    identities, links = _file_identities(paths), [os.path.islink(path) for path in paths]
    chosen = {}
    for i, identity in enumerate(identities):
        if identity not in chosen or (links[chosen[identity]] and not links[i]):
            chosen[identity] = i
    kept = set(chosen.values())
    duplicates = [(path, f"same file as {_shown_path(paths[chosen[identity]], shown_root)}")
                  for i, (path, identity) in enumerate(zip(paths, identities)) if i not in kept]
    return [path for i, path in enumerate(paths) if i in kept], duplicates


def _file_identities(paths: list[str]) -> list:
    """What makes each path the file it is: its device and inode, so that symbolic links, hard links
    and a folder reached twice all lead to one file (its real path if it cannot be looked up)."""
    identities = []
    for path in paths:
        try:
            info = os.stat(path)
            identities.append((info.st_dev, info.st_ino))
        except OSError:
            identities.append(os.path.realpath(path))
    return identities


_SPECIAL_FILES = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def _not_regular(info: os.stat_result) -> str | None:
    """``"not a regular file (FIFO)"`` and the like, or None for a regular file."""
    if stat.S_ISREG(info.st_mode):
        return None
    kind = next((name for is_kind, name in _SPECIAL_FILES if is_kind(info.st_mode)), "special file")
    return f"not a regular file ({kind})"


def _file_problem(path: str) -> str | None:
    """Why ``path`` (links followed) cannot be opened safely, or None for a regular file."""
    try:
        return _not_regular(os.stat(path))
    except OSError as err:
        return f"unreadable: {err.strerror}"


def _decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded into an RGB image, or None if it can."""
    if problem := _file_problem(path):
        return problem
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
    if problem := _file_problem(path):
        return problem
    return None if Path(path).suffix.lower() in Image.registered_extensions() else "not an image extension"


def _relative_parts(path: str, folder) -> list[str]:
    return os.path.relpath(path, folder).split(os.sep)


def _shown_path(path: str, shown_root) -> str:
    return os.path.relpath(path, shown_root) if shown_root else path


def _listing(skipped: list[tuple[str, str]], shown_root) -> str:
    return ", ".join(f"{_shown_path(path, shown_root)} ({reason})" for path, reason in skipped)


def _warn_skipped(skipped: list[tuple[str, str]], shown_root) -> None:
    """One warning that lists every skipped file with its reason (none when nothing was skipped)."""
    if skipped:
        where = f" in {str(shown_root).rstrip('/')}/" if shown_root else ""
        warnings.warn(f"skipped {len(skipped)} file{'s' * (len(skipped) > 1)}{where}: "
                      f"{_listing(skipped, shown_root)}", stacklevel=3)

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
        raise DataError(f"cannot split {fraction:g} of the {len(images)} images in {images.root}/ by class "
                        f"({err}): hold out at least one image of each of the {len(counts)} classes and keep "
                        "at least one, or give a folder") from None
    return images.subset(np.sort(kept)), images.subset(np.sort(held_out))


def load_splits(train: str | Path, val: float | str | Path | None = 0.2,
                test: float | str | Path | None = None, seed: int = 0, follow_links: bool = False,
                screen: bool = True) -> Splits:
    """Train / val / test image sets from a folder (or ``builtin:...``) and fractions or folders.

    Fractions are of the whole train folder: with ``val=0.2, test=0.1`` on 500 images, test gets
    50 and val 100 (test is split off first, then val from the rest), train keeps 350. Folders are
    scanned by :func:`scan_folder`; folders that share a file (the same folder twice, or links from one
    into the other) are refused, so no image is on both sides of a split.

    Args:
        train: class-per-folder images, or ``"builtin:digits"``.
        val: a stratified fraction in (0, 1), a folder with the same classes, or None.
        test: like ``val``.
        seed: random state of the splits.
        follow_links: also use links to files outside each folder (``data.follow_links``).
        screen: decode every file to catch bad ones; False only lists the folders (as
            ``transferkit validate`` does: nothing is read).

    Returns:
        :class:`Splits`; ``Splits.skipped`` lists every skipped file once.
    """
    given = {"test": test, "val": val}  # test first: val is then split from what remains
    fractions = {key: value for key, value in given.items() if _is_fraction(key, value)}
    if sum(fractions.values()) >= 1:
        raise DataError(f"data.val + data.test = {sum(fractions.values()):g} leaves no training images: "
                        "make their sum less than 1")
    train_set = _scan_source("train", train, follow_links=follow_links, screen=screen)
    parts = {key: None if value is None else _scan_source(key, value, train_set.class_names, follow_links, screen)
             for key, value in given.items() if key not in fractions}
    _refuse_shared_files({"train": train_set, **parts})
    total = len(train_set)
    for key, fraction in fractions.items():  # counts of the whole, rounded up like scikit-learn
        try:
            train_set, parts[key] = stratified_split(train_set, math.ceil(fraction * total), seed)
        except DataError as err:
            raise DataError(f"data.{key}: {err}") from None
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


def _scan_source(key: str, source, class_names=None, follow_links: bool = False, screen: bool = True) -> ImageSet:
    """scan_folder(resolve_source(source)), with errors prefixed by the recipe key."""
    try:
        return scan_folder(resolve_source(source), class_names, screen=screen, follow_links=follow_links)
    except DataError as err:
        raise DataError(f"data.{key}: {err}") from None


def _refuse_shared_files(parts: dict[str, ImageSet | None]) -> None:
    """DataError when two split folders hold the same real file (an image on both sides of the split)."""
    owner = {}
    for key, images in parts.items():
        shared = []
        paths = images.paths if images is not None else []
        for path, identity in zip(paths, _file_identities(paths)):
            first = owner.setdefault(identity, (key, path))
            if first[0] != key:
                shared.append((path, first))
        if shared:
            path, (other, other_path) = shared[0]
            raise DataError(f"data.{key}: {len(shared)} image(s) of {images.root}/ are also in data.{other} "
                            f"(e.g. {path} is {other_path}): give folders that share no files, or a fraction")


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
    return resize(_open_rgb(path, draft_size=image_size), image_size)


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


def resize(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize to a ``size`` x ``size`` square with Pillow's bilinear filter (aspect ratio not kept).

    The one resize of transferkit: files (:func:`load_image`), pixel arrays given to
    :class:`~transferkit.features.transformer.FeatureExtractor` and :mod:`transferkit.features.measure` all go through it.

    Args:
        image: a Pillow image, or pixels ``[height, width, channels]``: uint8 (resized as a Pillow
            image) or any other number type (each channel resized as 32-bit floats, so values are
            neither rounded nor clipped).
        size: side of the square output.

    Returns:
        ``[size, size, channels]``: uint8 from a Pillow image or uint8 pixels, else float32.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            planes = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)) for c in range(image.shape[-1])]
            return np.stack([resize(plane, size) for plane in planes], axis=-1)
        image = Image.fromarray(image)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """:func:`resize` of each of ``images`` (``[n, height, width, channels]``); unchanged (not copied)
    when they are ``size`` x ``size`` already."""
    if images.shape[1:3] == (size, size):
        return images
    if not len(images):
        return np.zeros((0, size, size, *images.shape[3:]), images.dtype if images.dtype == np.uint8 else np.float32)
    return np.stack([resize(image, size) for image in images])


def _open_rgb(path: str | Path, draft_size: int) -> Image.Image:
    """Open, fully decode and orient an image, as RGB.

    ``draft_size`` lets JPEG decoding shrink by up to 8x while staying at least that large. Anything
    but a regular file (a FIFO would block) raises :class:`~transferkit.errors.DataError` unopened.
    """
    if problem := _file_problem(str(path)):
        raise DataError(f"cannot decode {path}: {problem}")
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
