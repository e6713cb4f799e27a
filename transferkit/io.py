"""Writing files so that nothing half-written is ever mistaken for a finished one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    Example:
        >>> with atomic_path("runs/a/metrics.json") as tmp:
        ...     Path(tmp).write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a hidden name that keeps the suffix, for writers that check it (keras wants ".keras")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def transferkit_home() -> Path:
    """Where transferkit keeps caches: ``$TRANSFERKIT_HOME``, default ``~/.cache/transferkit``."""
    return Path(os.environ.get("TRANSFERKIT_HOME") or Path.home() / ".cache" / "transferkit")
