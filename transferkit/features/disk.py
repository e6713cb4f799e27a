"""Disk space for the feature store: checked before a split is created, allocated up front, reserved.

A full disk is an error of one line, before anything is written: HDF5 cannot recover from a failed
write (the next flush, or the interpreter's exit, crashes the process), so the free space is
checked before a split is created and the features' whole extent is then reserved on disk
(``posix_fallocate``), so that writing a chunk never runs out of space.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np

from transferkit.errors import ResourceError
from transferkit.io import format_bytes, require_space

MORE_SPACE = ", or set TRANSFERKIT_HOME to a folder on a disk with more room"


def split_bytes(paths: list[str], dim: int) -> int:
    """What a split takes on disk: features, labels and paths (with HDF5's per-string overhead)."""
    return len(paths) * (dim * 4 + 8 + 16) + sum(len(path.encode()) for path in paths)


def preallocated():
    """Dataset creation properties that allocate all storage (and the chunk index) up front."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def create_features(group: h5py.Group, n: int, first_chunk: np.ndarray, chunk_size: int) -> None:
    """The split's features dataset, once the disk is known to hold it, with every chunk allocated."""
    if first_chunk.ndim != 2:
        raise ValueError(f"embed must return a 2-D array [n, D], got shape {first_chunk.shape}")
    dim = first_chunk.shape[1]
    require_space(Path(group.file.filename).parent, n * dim * 4, f"the features of {n} images "
                  f"({group.name.lstrip('/')})", then=MORE_SPACE)
    group.create_dataset("features", shape=(n, dim), dtype=np.float32,
                         chunks=(min(chunk_size, n), dim), dcpl=preallocated(), fill_time="never")
    group.file.flush()


def reserve(path: Path) -> None:
    """Give the file's unwritten (sparse) extent real blocks, so that writing features into it can
    never fail for lack of space; ``OSError(ENOSPC)`` here, while HDF5 has nothing unwritten."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:  # macOS, Windows: the space check alone
        return
    fd = os.open(path, os.O_RDWR)
    try:
        allocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            missing = os.fstat(fd).st_size - os.fstat(fd).st_blocks * 512
            raise ResourceError(f"not enough space for the features in {path.parent}: about {format_bytes(missing)} "
                                f"more are needed; free some space{MORE_SPACE}") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)
