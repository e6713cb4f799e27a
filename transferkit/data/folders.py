"""Finding the images of class-per-folder directories and screening out files that cannot be used.

:func:`scan_folder` lists ``root/<class>/**/<image>`` as an :class:`~transferkit.data.sources.ImageSet`
and :func:`find_images` the files named to predict; a bad file (unreadable, not an image, not a regular
file, a link not followed, a second path to one file) is skipped and listed in one ``UserWarning``, a bad
folder raises :class:`~transferkit.errors.DataError`. Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.data.decode import decode_problem, file_problem, not_regular
from transferkit.data.sources import ImageSet, require_folder
from transferkit.errors import DataError


#: what a skipped link to a file outside the data folder says to do
FOLLOW_LINKS_FIX = "set data.follow_links: true (Python: follow_links=True) to use it"
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
    root = require_folder(root)
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
    unique, duplicates = each_file_once([path for path, _ in candidates], root)
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
    check = decode_problem if decode else _extension_problem
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
    unique, duplicates = each_file_once(list(dict.fromkeys(paths)))
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
            skipped.append((entry.path, entry_problem(entry.path, os.path.realpath(root), False)))
    return folders, skipped


def _files_under(folder: Path, root: Path, follow_links: bool = False,
                 outside_fix: str = FOLLOW_LINKS_FIX) -> tuple[list[str], list[tuple[str, str]]]:
    """Candidate files below ``folder`` (within the data folder ``root``) and the entries skipped there.

    Only real sub-folders are walked (a link to a folder is skipped, never entered), and no file is
    opened: each entry is judged from ``lstat``/``stat`` by :func:`entry_problem`. Hidden names are
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
            elif problem := entry_problem(entry.path, real_root, follow_links, outside_fix):
                skipped.append((entry.path, problem))
            else:
                files.append(entry.path)
    files.sort(key=lambda path: _relative_parts(path, folder))
    skipped.sort(key=lambda item: _relative_parts(item[0], folder))
    return files, skipped


def entry_problem(path: str, real_root: str, follow_links: bool,
                  outside_fix: str = FOLLOW_LINKS_FIX) -> str | None:
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
    return not_regular(info)


def each_file_once(paths: list[str], shown_root=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Each real file once: where it lies itself if listed, else its first link; the rest are skipped.

    Returns:
        ``(kept paths in the given order, [(path, "same file as <kept path>"), ...])``.
    """
    identities, links = file_identities(paths), [os.path.islink(path) for path in paths]
    chosen = {}
    for i, identity in enumerate(identities):
        if identity not in chosen or (links[chosen[identity]] and not links[i]):
            chosen[identity] = i
    kept = set(chosen.values())
    duplicates = [(path, f"same file as {_shown_path(paths[chosen[identity]], shown_root)}")
                  for i, (path, identity) in enumerate(zip(paths, identities)) if i not in kept]
    return [path for i, path in enumerate(paths) if i in kept], duplicates


def file_identities(paths: list[str]) -> list:
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


def _extension_problem(path: str) -> str | None:
    if problem := file_problem(path):
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
