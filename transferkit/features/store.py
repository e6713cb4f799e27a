"""The HDF5 feature store: features computed once per configuration, cached and resumable.

One HDF5 file per (backbone, layers, size) configuration, one group per split::

    <split>/features  float32 [N, D], chunked along N, every chunk allocated when it is created
    <split>/labels    int64 [N]
    <split>/paths     variable-length UTF-8 [N]
    <split>/done      uint8 [number of chunks], 1 once that chunk's features are on disk
    <split>.attrs     key, complete, chunk_size and the caller's attrs (non-scalars as JSON)

Durability under ``kill -9``: a new file is created empty under a temporary name and renamed, so
it is never half-made. All metadata of a split (group, datasets, chunk index) is written and
flushed before any feature is; from then on a chunk only overwrites its own preallocated bytes, is
flushed, and only then gets its byte in ``done`` set and flushed. A kill while writing a chunk
leaves it unmarked, so it is recomputed; a kill while creating metadata can leave a file h5py
cannot read, which is moved aside as ``<name>.corrupt-<timestamp>`` and rebuilt. Completeness is
read from the key, ``complete`` and ``done``, never from the file's existence.

A split computed in shards (:mod:`transferkit.features.shards`) is stored as virtual datasets mapped
onto the shard files ``<stem>.shard-I-of-N.h5`` beside it; it counts as complete only while every
one of them holds that split, complete, under the same key.

A full disk is an error of one line, before anything is written: the space is checked and then
reserved on disk (see :mod:`transferkit.features.disk` for why HDF5 needs it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from transferkit.version import __version__
from transferkit.features.cache import touch
from transferkit.errors import TransferkitError
from transferkit.features.disk import MORE_SPACE, create_features, preallocated, reserve, split_bytes
from transferkit.features.progress import ExtractionProgress
from transferkit.io import atomic_path, disk_full_is_one_line, require_space

logger = logging.getLogger("transferkit")

#: ``embed(paths) -> features [n, D]``. An embed that also has ``load(paths) -> inputs`` and
#: ``forward(inputs) -> features`` is run in two stages: the next chunk loads while this one runs.
Embed = Callable[[list[str]], np.ndarray]
_OWN_ATTRS = ("key", "complete", "chunk_size")
#: The shard files of a store ``<stem>.h5`` (see :mod:`transferkit.features.shards`).
SHARD_FILES = "{stem}.shard-*-of-*.h5"
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def cache_key(**parts) -> str:
    """A stable digest of everything that affects features.

    Args:
        **parts: backbone, weights, layers, pooling, image_size, tta, ... as JSON-able values.
            ``files`` (ordered paths) and a ``weights`` value naming a file get each file's size and
            mtime folded in; the transferkit version is added unless given.

    Returns:
        16 hex characters, equal across processes for equal inputs.

    Example:
        >>> cache_key(backbone="mobilenet_v2", layers=["top"], image_size=224, files=paths)
    """
    parts.setdefault("transferkit", __version__)
    parts["files"] = [_stamp(path) for path in parts.get("files", ())]
    weights = parts.get("weights")
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        parts["weights"] = _stamp(weights)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stamp(path) -> list:
    try:
        stat = os.stat(path)
    except OSError as err:
        raise TransferkitError(
            f"{path}: cannot stat it for the feature cache key ({err.strerror}); "
            "restore the file or re-scan the image folder"
        ) from None
    return [os.fspath(path), stat.st_size, stat.st_mtime_ns]


class FeatureStore:
    """One HDF5 file per (backbone, layers, size) configuration; one group per split.

    Example:
        >>> store = FeatureStore("cache/mobilenet_v2-top-224.h5")
        >>> x, y = store.compute("train", paths, labels, embed, key=cache_key(files=paths, ...))
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def compute(
        self,
        split: str,
        paths: Sequence[str],
        labels,
        embed: Embed,
        *,
        key: str,
        attrs: dict | None = None,
        chunk_size: int = 256,
        progress: bool = True,
        dim: int | None = None,
        load: bool = True,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Features for every path, computed chunk by chunk and saved as they come.

        A complete split with the same key is returned without calling ``embed``; an incomplete
        one resumes at the first chunk not marked done; another key rebuilds the split.

        Args:
            split: group name, e.g. "train".
            paths: image files, in order.
            labels: one integer class index per path.
            embed: ``embed(list_of_paths) -> array [n, D]``.
            key: from :func:`cache_key`.
            attrs: stored with the split (backbone, weights, layers, image_size, class_names...).
            chunk_size: images per call to ``embed`` and per resumable unit (a resumed split
                keeps the chunk size it was started with).
            progress: print progress to stderr.
            dim: the number of features per image, when known: the free space is then checked
                before anything is computed (else once the first chunk gives it).
            load: read the features back; False leaves them on disk (features larger than memory).

        Returns:
            (features float32 [N, D], labels int64 [N]) read back from the file; None if not ``load``.

        Raises:
            ResourceError: the disk lacks the space for the split (checked before writing).
        """
        paths = [os.fspath(path) for path in paths]
        labels = np.asarray(labels, dtype=np.int64)
        if not paths or labels.shape != (len(paths),):
            raise ValueError(f"need one label per path and at least one path, got {len(paths)} "
                             f"paths and labels of shape {labels.shape}")
        features = self._complete(split, paths, labels, key, load)  # read-only: a full disk does not matter
        if features is None:
            with disk_full_is_one_line(self.path.parent, then=MORE_SPACE):
                require_space(self.path.parent, 0, "the feature store", then=MORE_SPACE)
                with self.open_for_writing() as file:
                    group = self._prepare_group(file, split, paths, labels, key, attrs or {}, chunk_size, dim)
                    self._fill(file, group, paths, embed, progress)
                    features = _read(group)[:2] if load else ()
        for path in (self.path, *self.path.parent.glob(SHARD_FILES.format(stem=self.path.stem))):
            touch(path)  # its last use, for clear_cache(older_than_days=...)
        return features if load else None

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """Returns (features, labels, paths) of a complete split, or None."""
        def read(file):
            group = file.get(split)
            return _read(group) if group is not None and _describe_split(group)["complete"] else None
        return self._read_only(read, None)

    def info(self) -> dict:
        """Returns {split: {n, dim, complete, key, attrs}}; {} if there is no readable file."""
        return self._read_only(_describe, {})

    def _read_only(self, read, default):
        if not self.path.exists():
            return default
        try:
            with h5py.File(self.path, "r") as file:
                return read(file)
        except _H5_ERRORS as err:
            logger.warning("cannot read feature store %s (%s)", self.path, err)
            return default

    def _complete(self, split, paths, labels, key, load=True) -> tuple[np.ndarray, np.ndarray] | None:
        """The split's features and labels (``()`` unless ``load``) if it is complete for exactly these
        paths, labels and key."""
        if not self.path.exists():
            return None
        try:
            with h5py.File(self.path, "r") as file:
                group = file.get(split)
                if group is None or not _describe_split(group)["complete"] or group.attrs["key"] != key \
                        or list(group["paths"].asstr()[()]) != paths or not np.array_equal(group["labels"][()], labels):
                    return None
                return _read(group)[:2] if load else ()
        except _H5_ERRORS:  # unreadable or locked: the writing path says which
            return None

    def open_for_writing(self) -> h5py.File:
        """Open the file; one h5py cannot read is moved aside and a new one started."""
        file = None
        try:
            if not self.path.exists():
                self._create_empty()
            file = h5py.File(self.path, "a")
            _describe(file)  # touches every split's attributes and datasets
            return file
        except _H5_ERRORS as err:
            if getattr(err, "errno", None):  # locked, permissions...: the file may be fine
                raise TransferkitError(f"{self.path}: cannot open feature store ({err}); "
                                       "is another run using it?") from None
            if file is not None:
                file.close()
            aside = self.path.with_name(
                f"{self.path.name}.corrupt-{datetime.now():%Y%m%d-%H%M%S-%f}")
            os.replace(self.path, aside)
            logger.warning("feature store %s is unreadable (%s); moved it to %s and starting over",
                           self.path, err, aside)
            self._create_empty()
            return h5py.File(self.path, "a")

    def _create_empty(self) -> None:
        """An empty HDF5 file, created under a temporary name and renamed: never half-made."""
        with atomic_path(self.path) as tmp:
            h5py.File(tmp, "w").close()

    def _prepare_group(self, file, split, paths, labels, key, attrs, chunk_size, dim=None) -> h5py.Group:
        """The split's group: kept if its key and file list match, else (re)created and flushed
        (once the disk is known to hold it)."""
        group = file.get(split)
        if group is not None and not _sources_intact(group):  # a shard file it maps onto is gone or rewritten
            del file[split]
            group = None
        if group is not None:
            stored_paths = list(group["paths"].asstr()[()])
            reason = ("file list changed" if stored_paths != paths else
                      "cache key changed" if group.attrs["key"] != key else None)
            if reason is None:
                if not np.array_equal(group["labels"][()], labels):
                    group["labels"][...] = labels
                return group
            logger.info("features for %r in %s out of date: %s; recomputing", split, self.path,
                        reason)
            del file[split]
        require_space(self.path.parent, split_bytes(paths, dim or 0),
                      f"the features of {len(paths)} images ({split})", then=MORE_SPACE)
        group = file.create_group(split)
        group.attrs.update({name: _attr_value(value) for name, value in attrs.items()})
        group.attrs.update({"key": key, "complete": False, "chunk_size": chunk_size})
        group.create_dataset("labels", data=labels)
        group.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
        # zeros written explicitly: space freed by a deleted group is reused without a fill
        group.create_dataset("done", data=np.zeros(math.ceil(len(paths) / chunk_size), np.uint8),
                             dcpl=preallocated())
        file.flush()
        return group

    def _fill(self, file: h5py.File, group: h5py.Group, paths: list[str], embed: Embed,
              progress: bool) -> None:
        """Compute every chunk not marked done; mark the split complete."""
        chunk_size = int(group.attrs["chunk_size"])
        done = group["done"]
        todo = np.flatnonzero(done[()] == 0)
        chunks = [(i * chunk_size, min((i + 1) * chunk_size, len(paths))) for i in todo]
        remaining = sum(stop - start for start, stop in chunks)
        report = ExtractionProgress(group.name.lstrip("/"), len(paths), len(paths) - remaining,
                                    progress and remaining > 0)
        if "features" in group and len(todo):
            reserve(self.path)
        for index, (start, stop), features in zip(todo, chunks, _chunk_features(embed, paths, chunks)):
            features = np.asarray(features, dtype=np.float32)
            if "features" not in group:
                create_features(group, len(paths), features, chunk_size)
                reserve(self.path)
            expected = (stop - start, group["features"].shape[1])
            if features.shape != expected:
                raise ValueError(f"embed returned shape {features.shape} for {expected[0]} "
                                 f"images, expected {expected}")
            group["features"][start:stop] = features
            file.flush()  # the features are on disk before the chunk is marked done
            done[index] = 1
            file.flush()
            report.advance(stop - start)
        if not group.attrs["complete"]:
            group.attrs.modify("complete", True)  # in place: same type and size
            file.flush()


def _chunk_features(embed: Embed, paths: list[str], chunks: list[tuple[int, int]]):
    """Each chunk's features in turn; with a two-stage embed the next chunk loads in a thread meanwhile."""
    if not (hasattr(embed, "load") and hasattr(embed, "forward")):
        for start, stop in chunks:
            yield embed(paths[start:stop])
        return
    with ThreadPoolExecutor(1) as pool:
        loading = [pool.submit(embed.load, paths[start:stop]) for start, stop in chunks[:1]]
        for i in range(len(chunks)):
            inputs = loading[i].result()
            if i + 1 < len(chunks):
                start, stop = chunks[i + 1]
                loading.append(pool.submit(embed.load, paths[start:stop]))
            loading[i] = None  # let the decoded chunk go once it is used
            yield embed.forward(inputs)


def _read(group: h5py.Group) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return group["features"][()], group["labels"][()], list(group["paths"].asstr()[()])


def _describe(file: h5py.File) -> dict:
    return {name: _describe_split(group) for name, group in file.items()}


def _describe_split(group: h5py.Group) -> dict:
    features = group.get("features")
    return {
        "n": group["paths"].shape[0],
        "dim": None if features is None else features.shape[1],
        "complete": bool(group.attrs["complete"]) and bool(group["done"][()].all()) and _sources_intact(group),
        "key": str(group.attrs["key"]),
        "attrs": {name: _plain(value) for name, value in group.attrs.items()
                  if name not in _OWN_ATTRS},
    }


def _sources_intact(group: h5py.Group) -> bool:
    """Whether every shard file the split's virtual features map onto holds the split, complete, under its key
    (True for a split stored in the file itself)."""
    features = group.get("features")
    if features is None or not features.is_virtual:
        return True
    folder = Path(group.file.filename).parent
    for name in sorted({source.file_name for source in features.virtual_sources()}):
        try:
            with h5py.File(folder / name, "r") as file:
                part = file.get(group.name)
                if part is None or part.attrs["key"] != group.attrs["key"] or not part.attrs["complete"]:
                    return False
        except _H5_ERRORS:
            return False
    return True


def _attr_value(value):
    """Scalars and strings as themselves, anything else (lists, dicts, None) as JSON."""
    return value if isinstance(value, (str, bool, int, float)) else json.dumps(value, default=str)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
