"""Labels files: a dataset's images listed in a CSV file (``path,label`` or ``path,label,split``).

:func:`read_labels` reads one with the :mod:`csv` module within bounds (:data:`MAX_LINE` characters a line,
:data:`MAX_ROWS` rows, :data:`MAX_BYTES` bytes), and screens each listed file as
:func:`~transferkit.data.folders.scan_folder` screens a folder's: paths are relative to the CSV's folder, and a
row whose file lies outside that folder (by ``..``, an absolute path or a symbolic link) is skipped unless
``follow_links``. Bad rows are skipped and listed in one ``UserWarning``; a file that cannot be a labels file
raises :class:`~transferkit.errors.DataError`. Nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from transferkit.data.decode import not_regular
from transferkit.data.folders import FOLLOW_LINKS_FIX, each_file_once, entry_problem, screen_files
from transferkit.data.sources import BUILTIN_PREFIX, ImageSet
from transferkit.errors import DataError

#: the columns of a labels file's header (in any order); ``split`` is optional
COLUMNS = ("path", "label", "split")
#: the values of the split column
SPLIT_NAMES = ("train", "val", "test")
#: the longest line (a path is at most 4096 bytes on Linux), the most rows and the largest file read:
#: a larger or malformed file is refused before it can fill the memory
MAX_LINE = 8192
MAX_ROWS = 2_000_000
MAX_BYTES = 512 * 2**20
#: bad rows a warning names; the rest are counted
SHOWN_ROWS = 5
_EXPECTED = "path,label or path,label,split"


class _Row(NamedTuple):
    line: int
    text: str  # the path as written
    label: str
    split: str | None


def is_labels_file(source) -> bool:
    """Whether the data source ``source`` names a labels CSV (a ``.csv`` name that is not a folder)."""
    text = str(source)
    return not text.startswith(BUILTIN_PREFIX) and text.lower().endswith(".csv") and not os.path.isdir(text)


def has_split_column(source) -> bool:
    """Whether ``source`` is a labels CSV whose header has a split column; False when it cannot be read
    (:func:`read_labels` says why)."""
    if not is_labels_file(source):
        return False
    try:
        with _open(source) as file:
            return "split" in _columns(csv.reader(_lines(file, source)), source)
    except (DataError, csv.Error):
        return False


def read_labels(path: str | Path, class_names: list[str] | None = None, screen: bool = True,
                follow_links: bool = False) -> tuple[ImageSet, np.ndarray | None]:
    """The images a labels CSV lists, and the split of each when it has a split column.

    The file starts with the header ``path,label`` or ``path,label,split`` (split values: train, val,
    test). Paths are relative to the CSV's folder (absolute ones are allowed). Class names are the
    sorted distinct labels. Rows that cannot be used are skipped and listed, first few and a count,
    in one warning: too few or too many fields, an empty path or label, an unknown split, a path
    listed twice (every row of it when the rows disagree on label or split), a missing file, a file
    outside the CSV's folder unless ``follow_links``, a second name of a file already listed, and
    (``screen=True``) a file that does not decode as an image.

    Args:
        path: the CSV file.
        class_names: the training classes, when reading a separate val/test file: its labels must be
            among them.
        screen: decode every file to catch bad ones; False only checks names and ``stat``.
        follow_links: also use files outside the CSV's folder.

    Returns:
        ``(images, splits)``: an :class:`ImageSet` whose ``root`` is the CSV file, images sorted by
        class then path, and each image's split name (None without a split column).

    Raises:
        DataError: the file is missing, too large, not UTF-8, has another header or no usable row.
    """
    rows, skipped, with_split = _read_rows(path)
    kept, bad = _screen_rows(rows, path, follow_links, screen)
    skipped = sorted(skipped + bad, key=lambda item: item[0].line)
    _warn_skipped(skipped, path)
    if not kept:
        listed = f" ({len(skipped)} row{'s' * (len(skipped) > 1)} skipped, listed above)" if skipped else ""
        raise DataError(f"no usable rows in {path}{listed}: list image files as path,label")
    class_names = _class_names(sorted({row.label for _, row in kept}), class_names, path)
    index = {name: i for i, name in enumerate(class_names)}
    kept.sort(key=lambda item: (index[item[1].label], item[0]))
    images = ImageSet([full for full, _ in kept], np.array([index[row.label] for _, row in kept], dtype=np.int64),
                      class_names, os.path.abspath(path),
                      [(f"{os.path.abspath(path)}:{row.line}", _reason(row, why)) for row, why in skipped])
    return images, np.array([row.split for _, row in kept]) if with_split else None


@contextlib.contextmanager
def _open(path):
    """The labels file, opened as UTF-8 text (a BOM allowed); DataError for a missing, special or too large file."""
    try:
        info = os.stat(path)
    except OSError as err:
        problem = "labels file not found" if not os.path.lexists(path) else f"labels file unreadable ({err.strerror})"
        raise DataError(f"{problem}: {path} (paths in a recipe are relative to the recipe's folder)") from None
    if problem := not_regular(info):
        raise DataError(f"{path}: {problem}: give a CSV file of path,label rows")
    if info.st_size > MAX_BYTES:
        raise DataError(f"{path}: {info.st_size:,} bytes, more than the {MAX_BYTES:,} a labels file may hold: "
                        "is it a CSV of path,label rows?")
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            yield file
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}): save it as a UTF-8 CSV") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None


def _lines(file, path):
    """The file's lines, none read past :data:`MAX_LINE` characters."""
    number = 0
    while line := file.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE:
            raise DataError(f"{path}: line {number} is longer than {MAX_LINE} characters: a labels CSV holds one "
                            "image a line (path,label[,split])")
        yield line


def _columns(reader, path) -> list[str]:
    """The header's column names; DataError when it is not ``path,label[,split]``."""
    header = next(reader, None)
    names = [name.strip().lower() for name in header or []]
    if sorted(names) not in (sorted(COLUMNS[:2]), sorted(COLUMNS)):
        found = f"starts with {','.join(header)!r}" if header else "is empty"
        raise DataError(f"{path} {found}: expected the header {_EXPECTED} as its first line")
    return names


def _read_rows(path) -> tuple[list[_Row], list[tuple[_Row, str]], bool]:
    """The well-formed rows, the others with their reason, and whether the file has a split column."""
    rows, bad = [], []
    with _open(path) as file:
        reader = csv.reader(_lines(file, path))
        try:
            names = _columns(reader, path)
            for fields in reader:
                if len(rows) + len(bad) >= MAX_ROWS:
                    raise DataError(f"{path}: more than {MAX_ROWS} rows: give a smaller dataset")
                if any(field.strip() for field in fields):  # blank lines are skipped silently
                    row, problem = _parse(fields, names, reader.line_num)
                    if problem:
                        bad.append((row, problem))
                    else:
                        rows.append(row)
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: {err}: check its quotes") from None
    return rows, bad, "split" in names


def _parse(fields: list[str], names: list[str], line: int) -> tuple[_Row, str | None]:
    """One row, and what is wrong with it (None: nothing)."""
    if len(fields) != len(names):
        where = names.index("path")
        text = fields[where].strip() if where < len(fields) else ""
        return _Row(line, text, "", None), f"{len(fields)} fields, expected {len(names)} ({','.join(names)})"
    value = {name: field.strip() for name, field in zip(names, fields)}
    row = _Row(line, value["path"], value["label"], value.get("split", "").lower() or None)
    if not row.text or "\0" in row.text:
        return row, "empty path" if not row.text else "a NUL character in the path"
    if not row.label:
        return row, "empty label"
    if "split" in names and row.split not in SPLIT_NAMES:
        return row, f"unknown split {value['split']!r}: expected {', '.join(SPLIT_NAMES)}"
    return row, None


def _screen_rows(rows: list[_Row], path, follow_links: bool, screen: bool):
    """``([(file path, row), ...] usable, [(row, reason), ...] skipped)``: each file once, inside the CSV's
    folder unless ``follow_links``, a regular file, and (``screen``) an image that decodes."""
    folder = os.path.dirname(os.path.abspath(path))
    real_root = os.path.realpath(folder)
    by_file: dict[str, list[_Row]] = {}
    for row in rows:
        by_file.setdefault(_absolute(folder, row.text), []).append(row)
    candidates, skipped = {}, []
    for full, same in by_file.items():
        if len({(row.label, row.split) for row in same}) > 1:
            lines = ", ".join(str(row.line) for row in same)
            skipped += [(row, f"listed on lines {lines} with different labels or splits") for row in same]
        elif problem := _file_problem(full, real_root, follow_links):
            skipped += [(row, problem) for row in same]
        else:
            candidates[full] = same[0]
            skipped += [(row, f"listed again (first on line {same[0].line})") for row in same[1:]]
    unique, duplicates = each_file_once(list(candidates), folder)
    good, unreadable = screen_files(unique, decode=screen, warn=False)
    skipped += [(candidates[full], reason) for full, reason in duplicates + unreadable]
    return [(full, candidates[full]) for full in good], skipped


def _absolute(folder: str, text: str) -> str:
    """The file a row names: ``text`` against the CSV's folder. Across ``..`` the folders are resolved as the
    system resolves them (a link's ``..`` is its target's parent), the file name kept."""
    joined = os.path.join(folder, text)
    if ".." not in Path(text).parts:
        return os.path.normpath(joined)
    head, name = os.path.split(joined)
    return os.path.join(os.path.realpath(head), name)


def _file_problem(path: str, real_root: str, follow_links: bool) -> str | None:
    """Why a listed file cannot be used (missing, outside the CSV's folder, a folder, a FIFO...), or None.
    Never opens it."""
    if not os.path.lexists(path):
        return "no such file"
    if not follow_links:
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            return f"{real} is outside {real_root}/: {FOLLOW_LINKS_FIX}"
    return entry_problem(path, real_root, follow_links=True)


def _class_names(found: list[str], class_names: list[str] | None, path) -> list[str]:
    """The labels found as the classes, or checked against the training ``class_names``."""
    if class_names is None:
        if len(found) == 1:
            raise DataError(f"only one class ({found[0]!r}) in {path}: a classifier needs at least two")
        return found
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise DataError(f"label {unknown[0]!r} in {path} is not among the training classes "
                        f"({', '.join(class_names)}): fix the label or remove the row")
    return list(class_names)


def _reason(row: _Row, why: str) -> str:
    return f"{row.text}: {why}" if row.text else why


def _warn_skipped(skipped: list[tuple[_Row, str]], path) -> None:
    """One warning naming the first :data:`SHOWN_ROWS` skipped rows and counting the rest."""
    if skipped:
        shown = ", ".join(f"line {row.line} ({_reason(row, why)})" for row, why in skipped[:SHOWN_ROWS])
        more = f" and {len(skipped) - SHOWN_ROWS} more" if len(skipped) > SHOWN_ROWS else ""
        warnings.warn(f"skipped {len(skipped)} row{'s' * (len(skipped) > 1)} of {path}: {shown}{more}",
                      stacklevel=3)
