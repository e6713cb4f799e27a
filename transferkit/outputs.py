"""Output folders that are written all-or-nothing and used by one run at a time.

A run never writes into its output folder. It writes a sibling, and when everything is there
(model, recipe, ``run.json``, reports) one rename puts it in place::

    runs/flowers/             the last complete run: untouched until the new one is complete
    runs/flowers.partial/     the run being written; fine-tuning checkpoints live here too
    runs/.flowers.lock        locked while a run uses runs/flowers (released when its process dies)
    runs/.flowers.old         only for an instant, where renaming cannot exchange two folders

On Linux the finished folder and the old one trade places in one step (``renameat2`` with
``RENAME_EXCHANGE``); elsewhere the old one is renamed aside, the new one into place, and a run
that finds the aside copy without an output folder puts it back. So ``kill -9`` at any moment
leaves the previous complete run folder (or none, if there was none). Files in the old folder that
a run does not write (your notes, a ``compare/``, ``tune/`` or ``lr_find/`` folder) are carried into the
new one.

Example:
    >>> with OutputFolder("runs/flowers") as out:
    ...     run.save(out.partial)
    ...     out.commit()
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from transferkit.errors import TransferkitError
from transferkit.io import disk_full_is_one_line, exclusive_lock

log = logging.getLogger("transferkit")

#: what a run writes into its folder, and what is derived from its model (replaced, never carried over)
RUN_ENTRIES = {"run.json", "recipe.yaml", "model", "history.json", "history.csv", "curves.png", "diagnosis.txt",
               "checkpoint", "evaluations", "export", "report.html"}
REPORT_PREFIXES = ("val_", "test_")


class OutputFolder:
    """A run's output folder: locked while in use, replaced in one step when the run is complete.

    Args:
        path: the output folder, e.g. ``runs/flowers``.
        resumable: ``resumable(partial) -> bool``: whether an unfinished run's sibling is worth
            keeping (a fine-tuning checkpoint); a sibling that is not is removed when a run
            starts and when it fails.
        restart: remove the sibling when the run starts even if it is resumable.

    Attributes:
        path: the output folder.
        partial: the sibling the run writes (``<path>.partial``).

    Raises:
        ResourceError: another run holds the folder.
        TransferkitError: ``path`` exists and is not a transferkit run folder.
    """

    def __init__(self, path: str | Path, *, resumable: Callable[[Path], bool] = lambda partial: False,
                 restart: bool = False):
        path = Path(path)
        path = path.resolve() if path.is_symlink() else Path(os.path.abspath(path))
        self.path, self.resumable, self.restart = path, resumable, restart
        self.partial = path.with_name(f"{path.name}.partial")
        self._aside = path.with_name(f".{path.name}.old")
        self._lock = folder_lock(path)
        self.committed = False

    def __enter__(self) -> "OutputFolder":
        with disk_full_is_one_line(self.path.parent):
            self._lock.__enter__()
            try:
                self._recover()
                _check_replaceable(self.path)
                if self.partial.exists() and (self.restart or not self.resumable(self.partial)):
                    shutil.rmtree(self.partial)
                self.partial.mkdir(parents=True, exist_ok=True)
            except BaseException:
                self._lock.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is not None and not self.committed and not self.resumable(self.partial):
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._lock.__exit__(kind, error, traceback)

    def commit(self, drop: tuple[str, ...] = ()) -> Path:
        """Put the finished sibling in place of the output folder, in one step.

        Args:
            drop: entries of the sibling to delete once it is in place (a finished run's
                ``checkpoint``): until the swap they keep the run resumable.

        Returns:
            The output folder.
        """
        if self.path.exists():
            _carry_over(self.path, self.partial)
            if _exchange(self.partial, self.path):  # the old folder is now at self.partial
                shutil.rmtree(self.partial)
            else:
                os.rename(self.path, self._aside)
                os.rename(self.partial, self.path)
                shutil.rmtree(self._aside)
        else:
            os.rename(self.partial, self.path)
        _sync_folder(self.path.parent)
        self.committed = True
        for name in drop:
            shutil.rmtree(self.path / name, ignore_errors=True)
        return self.path

    def _recover(self) -> None:
        """Finish what a killed swap left: the aside copy goes back, or away."""
        if self._aside.exists():
            if self.path.exists():
                shutil.rmtree(self._aside)
            else:
                os.rename(self._aside, self.path)
                log.info("restored the previous run folder %s", self.path)


def folder_lock(path: str | Path):
    """The lock of the folder ``path`` (a run's output, a comparison), held while something writes it:
    ``with folder_lock("runs/flowers"): ...`` raises :class:`ResourceError` at once if another process has it."""
    path = Path(os.path.abspath(path))
    return exclusive_lock(path.with_name(f".{path.name}.lock"), str(path))


def read_run_json(folder: str | Path) -> dict:
    """The ``run.json`` of a run folder, with its strategy, class names and image size.

    Raises:
        TransferkitError: ``folder`` is not a run folder, or its ``run.json`` is damaged.
    """
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise TransferkitError(f"not a run folder: {folder} (expected run.json there; "
                               f"train one with `transferkit extract RECIPE`)")
    keys = ("strategy", "class_names", "image_size")
    try:
        summary = json.loads((folder / "run.json").read_text())
        problem = None if isinstance(summary, dict) and all(key in summary for key in keys) \
            else f"it needs an object with {', '.join(keys)}"
    except ValueError as error:
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise TransferkitError(f"{folder / 'run.json'} is damaged ({problem}): train the run again")
    return summary


def _check_replaceable(path: Path) -> None:
    """A folder is replaced only if a run wrote it (or it is empty, or holds only a comparison, a search or
    a learning-rate sweep)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise TransferkitError(f"output {path} is a file: give a folder for output")
    names = {entry.name for entry in os.scandir(path) if not entry.name.startswith(".")}
    if names and not names & {"run.json", "checkpoint"} and not names <= {"compare", "tune", "lr_find"}:
        raise TransferkitError(f"output {path} exists and is not a transferkit run folder (it has no run.json): "
                               "give a new or empty folder for output")


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that a run does not write."""
    for entry in os.scandir(old):
        if entry.name in RUN_ENTRIES or entry.name.startswith(REPORT_PREFIXES) or (new / entry.name).exists():
            continue
        target = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, target)
        log.debug("kept %s from the previous run folder", entry.name)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _sync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where folders can be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
