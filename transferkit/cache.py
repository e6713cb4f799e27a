"""What transferkit keeps under ``$TRANSFERKIT_HOME``, and clearing it.

Extracted features (``features/*.h5``) and fitted classifiers (``classifiers/*.joblib``) are
cached so that a second run starts from them. Each file's modification time is its last use
(reuse touches it), so ``clear_cache(older_than_days=30)`` drops what no run has needed for a month.
Materialised built-in datasets (``builtin/``) are left alone.

Example:
    >>> [(entry.kind, entry.size) for entry in cache_entries()]
    >>> removed = clear_cache(older_than_days=30)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from transferkit.io import transferkit_home

KINDS = {"features": "*.h5", "classifiers": "*.joblib"}  # folder under the home -> its cache files


@dataclass
class CacheEntry:
    """One cached file: its kind (a key of :data:`KINDS`), path, size in bytes and last use (epoch seconds)."""
    kind: str
    path: Path
    size: int
    last_used: float


def cache_entries(home: str | Path | None = None) -> list[CacheEntry]:
    """Every cached file under ``home`` (default: :func:`transferkit_home`), least recently used first."""
    home = Path(home) if home is not None else transferkit_home()
    entries = []
    for kind, pattern in KINDS.items():
        for path in (home / kind).glob(pattern):
            stat = path.stat()
            entries.append(CacheEntry(kind, path, stat.st_size, stat.st_mtime))
    return sorted(entries, key=lambda entry: entry.last_used)


def clear_cache(older_than_days: float | None = None, home: str | Path | None = None) -> list[CacheEntry]:
    """Delete cached features and classifier fits, all or those unused for ``older_than_days``.

    Returns:
        The entries deleted.
    """
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else float("inf")
    removed = [entry for entry in cache_entries(home) if entry.last_used < cutoff]
    for entry in removed:
        entry.path.unlink(missing_ok=True)
    return removed


def touch(path: str | Path) -> None:
    """Mark a cache file as used now."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves
        pass
