"""Sharded feature extraction: slice I of N of each split's images in a file of its own, then one dataset.

``transferkit extract recipe.yaml --shard I/N`` (``tk.extract(recipe, shard=(I, N))``, I from 1 to N)
computes the features of shard I of every split of the feature store ``<stem>.h5`` into
``<stem>.shard-I-of-N.h5`` beside it. Shard I of a split of n images is the contiguous rows
``[(I-1)*n // N, I*n // N)`` of the split's image list in the store's (sorted) order: it depends on the list,
I and N alone, so shards run in any order, at the same time, on several machines sharing the folder.
A shard file is a :class:`~transferkit.features.store.FeatureStore` of its own (chunked, resumable,
crash-safe), written by its shard's process alone; the store file itself is left alone.

A run without a shard links them (:func:`link_shards`): once every shard of a split is complete under
the split's cache key, the store gets the split as HDF5 virtual datasets (``features``, ``labels``,
``paths``) mapped onto the shard files by relative name, so it reads as one matrix, nothing is computed
again, and the folder can move. Shards missing or incomplete: :class:`ShardsMissing` (exit 2), never a
silent recomputation; no shard at all: the store computes the split itself, as without sharding.

Example:
    >>> store = FeatureStore(home / "features" / "mobilenet-0123456789ab.h5")
    >>> compute_shard(store, "photos-4c1d", paths, labels, embed, key=key, shard=(2, 8))  # on machine 2
    >>> link_shards(store, "photos-4c1d", len(paths), key=key)                            # then, once
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from transferkit.errors import TransferkitError
from transferkit.features.disk import MORE_SPACE
from transferkit.features.store import SHARD_FILES, Embed, FeatureStore
from transferkit.io import disk_full_is_one_line

log = logging.getLogger("transferkit")

#: More shards than this is a typo (a job array that large would not share one folder).
MAX_SHARDS = 100_000
_SHARD_NAME = re.compile(r"\.shard-([0-9]+)-of-([0-9]+)\.h5")
_SHARD_ATTRS = ("key", "complete", "chunk_size", "shard", "rows")


class ShardsMissing(TransferkitError):
    """Some shards of a split are missing or incomplete: the message names them and the command that computes them."""

    def __init__(self, split: str, missing: Sequence[int], count: int, recipe: str = "RECIPE"):
        self.split, self.missing, self.count = split, list(missing), count
        commands = " and ".join(f"`transferkit extract {recipe} --shard {index}/{count}`" for index in self.missing[:3])
        more = f" (and {len(self.missing) - 3} more)" if len(self.missing) > 3 else ""
        super().__init__(f"the features of {split} are extracted in {count} shards and shard"
                         f"{'s' if len(self.missing) > 1 else ''} {', '.join(map(str, self.missing))} "
                         f"{'are' if len(self.missing) > 1 else 'is'} missing or incomplete: run {commands}{more}, "
                         f"then this command again")

    def for_recipe(self, recipe: str) -> "ShardsMissing":
        """The same error, its commands naming the recipe file ``recipe``."""
        return ShardsMissing(self.split, self.missing, self.count, recipe)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``, checked by :func:`check_shard`.

    Raises:
        TransferkitError: not of the form I/N with 1 <= I <= N.
    """
    match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", str(text))
    if match is None:
        raise TransferkitError(f"shard {text!r}: expected I/N, shard I of N counted from 1, e.g. 2/8")
    return check_shard((int(match[1]), int(match[2])))


def check_shard(shard) -> tuple[int, int]:
    """``shard`` as ``(I, N)`` with 1 <= I <= N <= :data:`MAX_SHARDS`.

    Raises:
        TransferkitError: anything else, in one line.
    """
    if not (isinstance(shard, (tuple, list)) and len(shard) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)):
        raise TransferkitError(f"shard {shard!r}: expected (I, N), shard I of N counted from 1, e.g. (2, 8)")
    index, count = int(shard[0]), int(shard[1])
    if not 1 <= count <= MAX_SHARDS:
        raise TransferkitError(f"shard {index}/{count}: N must be 1 to {MAX_SHARDS}")
    if not 1 <= index <= count:
        raise TransferkitError(f"shard {index}/{count}: shards are counted from 1 to N, so give 1/{count} to "
                               f"{count}/{count}")
    return index, count


def shard_rows(n: int, index: int, count: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of shard ``index`` of ``count`` (from 1) of a list of ``n`` images."""
    return (index - 1) * n // count, index * n // count


def shard_path(store_path: str | Path, index: int, count: int) -> Path:
    """The file of shard ``index`` of ``count`` of the store at ``store_path``: ``<stem>.shard-I-of-N.h5``."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}.shard-{index}-of-{count}.h5")


def compute_shard(store: FeatureStore, split: str, paths: Sequence[str], labels, embed: Embed, *, key: str,
                  shard: tuple[int, int], attrs: dict | None = None, **options) -> bool:
    """Compute shard ``(I, N)`` of a split into its own file, as :meth:`FeatureStore.compute` would the split.

    Args:
        store: the store the split belongs to; only read (to skip a split it already holds).
        split, paths, labels, embed, key, attrs: as for :meth:`FeatureStore.compute`, for the whole split.
        shard: ``(I, N)``, checked by :func:`check_shard`.
        **options: chunk_size, progress, dim, passed on.

    Returns:
        True if the shard's rows were computed (or found done), False if it has none or the store already
        holds the split complete.
    """
    index, count = check_shard(shard)
    held = store.info().get(split)
    if held and held["complete"] and held["key"] == key:
        log.info("shard %d/%d: %s is already extracted in %s", index, count, split, store.path)
        return False
    start, stop = shard_rows(len(paths), index, count)
    if start == stop:
        return False
    FeatureStore(shard_path(store.path, index, count)).compute(
        split, list(paths)[start:stop], np.asarray(labels)[start:stop], embed, key=key,
        attrs={**(attrs or {}), "shard": [index, count], "rows": [start, stop]}, load=False, **options)
    return True


def link_shards(store: FeatureStore, split: str, n: int, *, key: str) -> bool:
    """Put a split extracted in shards into ``store`` as virtual datasets over the shard files.

    Args:
        store: the feature store.
        split: the split's group name.
        n: its number of images.
        key: its cache key; shard files under another key are not its shards.

    Returns:
        True if the split was linked now; False if the store holds it already or no shard of it exists.

    Raises:
        ShardsMissing: shards exist, but some are missing or incomplete.
    """
    held = store.info().get(split)
    if held and held["complete"] and held["key"] == key:
        return False
    found = _shards_found(store.path, split, key)
    if not found:
        return False
    needed = {count: [i for i in range(1, count + 1) if _has_rows(n, i, count)] for count in found}
    missing = {count: [i for i in needed[count] if not found[count].get(i)] for count in found}
    count = min(found, key=lambda c: (len(missing[c]), c))  # complete first, else the fewest missing
    if missing[count]:
        raise ShardsMissing(split, missing[count], count)
    _write_virtual(store, split, key, n, [(i, *shard_rows(n, i, count)) for i in needed[count]], count)
    log.info("features: %s linked from %d shard files (%d images)", split, len(needed[count]), n)
    return True


def _has_rows(n: int, index: int, count: int) -> bool:
    start, stop = shard_rows(n, index, count)
    return start < stop


def _shards_found(store_path: Path, split: str, key: str) -> dict[int, dict[int, bool]]:
    """``{N: {I: complete}}`` of the shard files beside the store holding ``split`` under ``key``."""
    found: dict[int, dict[int, bool]] = {}
    for path in sorted(store_path.parent.glob(SHARD_FILES.format(stem=store_path.stem))):
        match = _SHARD_NAME.fullmatch(path.name[len(store_path.stem):])
        held = FeatureStore(path).info().get(split) if match else None
        if held and held["key"] == key:
            found.setdefault(int(match[2]), {})[int(match[1])] = held["complete"]
    return found


def _write_virtual(store: FeatureStore, split: str, key: str, n: int, parts: list[tuple[int, int, int]],
                   count: int) -> None:
    """The split's group in the store, its datasets mapped onto the shard files (``parts``: ``(I, start, stop)``);
    marked complete last, so that a kill leaves a group that the next run links again."""
    with disk_full_is_one_line(store.path.parent, then=MORE_SPACE), store.open_for_writing() as file:
        if split in file:
            del file[split]
        group = file.create_group(split)
        with h5py.File(shard_path(store.path, parts[0][0], count), "r") as first:
            source = first[split]
            group.attrs.update({name: value for name, value in source.attrs.items() if name not in _SHARD_ATTRS})
            chunk_size, dim = int(source.attrs["chunk_size"]), source["features"].shape[1]
            types = {name: source[name].dtype for name in ("features", "labels", "paths")}
        group.attrs.update({"key": key, "complete": False, "chunk_size": chunk_size})
        for name, dtype in types.items():
            shape = (n, dim) if name == "features" else (n,)
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            for index, start, stop in parts:
                layout[start:stop] = h5py.VirtualSource(f"./{shard_path(store.path, index, count).name}",
                                                        f"{split}/{name}", shape=(stop - start, *shape[1:]))
            group.create_virtual_dataset(name, layout)
        group.create_dataset("done", data=np.ones(math.ceil(n / chunk_size), np.uint8))
        file.flush()
        group.attrs.modify("complete", True)
        file.flush()

