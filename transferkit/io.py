"""Writing files so that nothing half-written is ever mistaken for a finished one, and saying so in
one line when the disk is full or another run holds a folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from transferkit.errors import ResourceError

#: kept free beyond what a write needs: file system metadata, the small files written beside it
SPACE_MARGIN = 1 << 20


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


# --------------------------------------------------------------------------------------------
# Full disks and locked folders
# --------------------------------------------------------------------------------------------

def require_space(folder: str | Path, needed: int, what: str, then: str = "") -> None:
    """Raise :class:`ResourceError` unless the disk of ``folder`` has ``needed`` bytes free (plus
    :data:`SPACE_MARGIN`).

    Args:
        folder: where the write goes (it need not exist yet).
        needed: bytes the write takes.
        what: what is written, e.g. ``"the epoch 3 checkpoint"``.
        then: what to do after freeing space, e.g. ``", then run again with --resume"``.
    """
    free = shutil.disk_usage(_existing(folder)).free
    if free < needed + SPACE_MARGIN:
        raise ResourceError(f"not enough space for {what} in {folder}: it needs {format_bytes(needed + SPACE_MARGIN)}, "
                            f"{format_bytes(free)} free; free some space{then}")


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a full disk or an exceeded quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(error) for sign in ("No space left on device", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def disk_full_is_one_line(folder: str | Path, then: str = ""):
    """Turn a full disk (ENOSPC, EDQUOT) met inside the block into one :class:`ResourceError` line
    naming the folder; every other error passes unchanged.

    Example:
        >>> with disk_full_is_one_line("runs/a", then=", then run again"):
        ...     atomic_write_text("runs/a/notes.txt", text)
    """
    try:
        yield
    except ResourceError:
        raise
    except Exception as error:
        if not disk_full(error):
            raise
        where = getattr(error, "filename", None) or folder
        free = format_bytes(shutil.disk_usage(_existing(where)).free)
        raise ResourceError(f"the disk is full writing to {where} ({free} free): free some space{then}") from None


def format_bytes(size: int) -> str:
    """``"1.5 MB"``, ``"320 kB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _existing(path: str | Path) -> Path:
    """``path`` or its nearest existing ancestor (for ``shutil.disk_usage``)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def exclusive_lock(path: str | Path, what: str):
    """Hold an exclusive lock on the file ``path`` (created if needed) for the block.

    The lock is the operating system's (``flock``), so it goes with the process: a run killed with
    ``kill -9`` leaves nothing to clean up. The file itself stays.

    Args:
        path: the lock file.
        what: the thing locked, for the error, e.g. ``"runs/flowers"``.

    Raises:
        ResourceError: another process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 32).decode(errors="replace").strip()
            raise ResourceError(f"{what} is in use by another transferkit run{f' (process {holder})' if holder else ''}: "
                                "wait for it to finish, or choose another output")
        try:  # who holds it, for the message above; on a full disk it can go unsaid
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
