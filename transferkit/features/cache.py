"""What transferkit keeps under ``$TRANSFERKIT_HOME``, and clearing it.

Extracted features (``features/``) and fitted classifiers (``classifiers/``) are cached so that a
second run starts from them. Each file's modification time is its last use (reuse touches it), so
``clear_cache(older_than_days=30)`` drops what no run has needed for a month.

Only files transferkit wrote are listed and deleted, recognised by their names (:data:`KINDS`):
feature stores ``<backbone>-<12 hex digits>.h5``, their shard files (``.shard-I-of-N.h5``) and the
``.corrupt-<time>`` copies a damaged one is moved to; classifier fits ``<32 hex digits>.npz`` or
``.skops`` (and ``.joblib``, the pickles of older versions, which are never opened); and what an
interrupted write left behind (``.<name>.<random>.tmp<suffix>``). Anything else there, folders and
links included, is left alone. Materialised built-in datasets (``builtin/``) are not a cache.

Example:
    >>> [(entry.kind, entry.size) for entry in cache_entries()]
    >>> print(format_cache(cache_entries()))
    >>> removed = clear_cache(older_than_days=30)
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from transferkit.io import transferkit_home

_FEATURE_STORE = r"[\w.-]+-[0-9a-f]{12}(?:\.shard-[0-9]+-of-[0-9]+)?"
_CLASSIFIER_FIT = r"[0-9a-f]{32}"
_TEMPORARY = r"\.(?:{name})\.[a-z0-9_]{{8}}\.tmp{suffix}"  # io.atomic_path's name for a file being written


def _names(name: str, suffix: str, *extra: str) -> re.Pattern:
    return re.compile("|".join([name + suffix, *extra, _TEMPORARY.format(name=name, suffix=suffix)]))


KINDS = {  # folder under the home -> the names of the files transferkit writes there
    "features": _names(_FEATURE_STORE, r"\.h5", _FEATURE_STORE + r"\.h5\.corrupt-[0-9-]+"),
    "classifiers": _names(_CLASSIFIER_FIT, r"\.(?:npz|skops|joblib)"),
}


@dataclass
class CacheEntry:
    """One cached file: its kind (a key of :data:`KINDS`), path, size in bytes and last use (epoch seconds)."""
    kind: str
    path: Path
    size: int
    last_used: float


def cache_entries(home: str | Path | None = None) -> list[CacheEntry]:
    """Every file transferkit cached under ``home`` (default: :func:`transferkit_home`), least recently used first."""
    home = Path(home) if home is not None else transferkit_home()
    entries = []
    for kind, names in KINDS.items():
        try:
            listing = list(os.scandir(home / kind))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in listing:
            if not names.fullmatch(item.name):
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted meanwhile
                continue
            if stat.S_ISREG(info.st_mode):
                entries.append(CacheEntry(kind, Path(item.path), info.st_size, info.st_mtime))
    return sorted(entries, key=lambda entry: entry.last_used)


def clear_cache(older_than_days: float | None = None, home: str | Path | None = None) -> list[CacheEntry]:
    """Delete cached features and classifier fits, all or those unused for ``older_than_days``.

    Returns:
        The entries deleted.
    """
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else float("inf")
    removed = []
    for entry in cache_entries(home):
        if entry.last_used < cutoff:
            try:
                entry.path.unlink()
            except FileNotFoundError:  # another clear got there first
                continue
            removed.append(entry)
    return removed


def format_cache(entries: list[CacheEntry], home: str | Path | None = None) -> str:
    """The cache as `transferkit cache` lists it: per kind, how many files, their size and the least recent use.

    Args:
        entries: from :func:`cache_entries`, least recently used first.
        home: the folder shown (default: :func:`transferkit_home`).
    """
    lines = [f"{home if home is not None else transferkit_home()}:"]
    for kind in KINDS:
        mine = [entry for entry in entries if entry.kind == kind]
        oldest = f", least recently used {_days_ago(mine[0].last_used)}" if mine else ""
        lines.append(f"  {kind:12s} {len(mine):4d} files {megabytes(sum(e.size for e in mine)):>10s}{oldest}")
    return "\n".join(lines)


def megabytes(size: int) -> str:
    """``size`` bytes as ``"1.5 MB"``."""
    return f"{size / 2**20:.1f} MB"


def _days_ago(timestamp: float) -> str:
    days = (time.time() - timestamp) / 86400
    return "today" if days < 1 else f"{days:.0f} days ago"


def touch(path: str | Path) -> None:
    """Mark a cache file as used now."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves
        pass
