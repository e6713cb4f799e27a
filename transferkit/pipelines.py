"""Input pipelines: an :class:`~transferkit.data.ImageSet` in, batches of float32 RGB pixels (0..255) out.

Two pipelines give the same batches: ``tf.data`` under Keras' TensorFlow backend, and a
``keras.utils.PyDataset`` (Pillow in a thread pool) everywhere else, so JAX and PyTorch machines
need no TensorFlow. Both decode in parallel, prefetch, and keep decoded images in memory up to a bound.

TensorFlow and Keras are imported inside the functions that need them, never at module level.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transferkit.data import ImageSet, load_image, load_images

PIPELINES = ("auto", "tf", "pydataset")
CACHE_FRACTION = 0.25  # cache: auto keeps decoded images in memory up to this share of the RAM
PREFETCH = 2  # batches the PyDataset pipeline decodes ahead

def make_dataset(images: ImageSet, image_size: int, batch_size: int = 32, *, shuffle: bool = False,
                 augment=None, seed: int = 0, pipeline: str = "auto", num_classes: int | None = None,
                 mix=None, cache: bool | str = False):
    """Batches of ``(pixels float32 [B, S, S, 3] in 0..255, labels int32 [B])`` for Keras.

    Args:
        images: the images.
        image_size: side ``S`` of the square images.
        batch_size: images per batch (the last batch may be smaller).
        shuffle: draw a new order every epoch (seeded).
        augment: a Keras layer applied to each batch in training mode (see
            :func:`transferkit.augment.build_augmentation`), or None.
        seed: random state of the shuffle.
        pipeline: ``"tf"`` (``tf.data``), ``"pydataset"`` (``keras.utils.PyDataset``, no TensorFlow
            needed) or ``"auto"``: ``"tf"`` under Keras' TensorFlow backend when TF is installed.
        num_classes: give it for one-hot float32 labels ``[B, num_classes]`` instead.
        mix: a batch function ``(pixels, one_hot) -> (pixels, one_hot)`` in NumPy run after
            ``augment``, e.g. :class:`transferkit.augment.BatchMixer`; needs ``num_classes``.
        cache: keep decoded images (uint8) in memory from the first epoch on: True (all), False
            (none), a number of images (at most that many), or "auto" (as many as fit in
            :data:`CACHE_FRACTION` of the physical memory). The images beyond the bound are
            decoded again every epoch.

    Returns:
        A ``tf.data.Dataset`` or a ``keras.utils.PyDataset``; both work with ``Model.fit`` and
        ``Model.predict`` and give identical un-augmented batches.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if pipeline == "auto":
        pipeline = "tf" if _tensorflow_backend() else "pydataset"
    if mix is not None and num_classes is None:
        raise ValueError("mix needs one-hot labels: give num_classes too")
    build = _tf_dataset if pipeline == "tf" else _image_batches_class()
    return build(images, image_size, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                 num_classes=num_classes, mix=mix, cache=cache_limit(cache, len(images), image_size))


def cache_limit(cache: bool | int | str, count: int, image_size: int) -> int:
    """How many of ``count`` decoded images to keep in memory for ``cache`` (see :func:`make_dataset`).

    "auto" counts each uint8 image twice (the cache and the shuffle buffer) against
    :data:`CACHE_FRACTION` of the physical memory.
    """
    if isinstance(cache, bool):
        return count if cache else 0
    if cache != "auto":
        return max(0, min(int(cache), count))
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: do not risk it
        return 0
    return min(count, int(CACHE_FRACTION * memory) // (2 * image_size * image_size * 3))


def _tensorflow_backend() -> bool:
    import importlib.util

    import keras

    return importlib.util.find_spec("tensorflow") is not None and keras.backend.backend() == "tensorflow"


def _tf_dataset(images: ImageSet, image_size: int, batch_size: int, *, shuffle, augment, seed, num_classes, mix,
                cache):
    """paths -> shuffle -> Pillow decode in parallel -> batch -> float32 -> augment -> one-hot, mix ->
    prefetch. The first ``cache`` images are decoded once and kept; with a shuffle they are drawn
    in random turns with the others."""
    import tensorflow as tf

    def decode(path):
        return load_image(path.decode(), image_size)

    def load(path, label):
        pixels = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        pixels.set_shape((image_size, image_size, 3))
        return pixels, label

    def part(start, stop, kept, salt=0):
        ds = tf.data.Dataset.from_tensor_slices((images.paths[start:stop], images.labels[start:stop].astype(np.int32)))
        if kept:  # decoded once, then shuffled from memory
            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
        if shuffle:
            ds = ds.shuffle(max(stop - start, 1), seed=seed + salt, reshuffle_each_iteration=True)
        return ds if kept else ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)

    count = len(images)
    if cache in (0, count):
        ds = part(0, count, kept=cache > 0)
    elif shuffle:
        ds = tf.data.Dataset.sample_from_datasets([part(0, cache, True), part(cache, count, False, salt=1)],
                                                  weights=[cache / count, 1 - cache / count], seed=seed)
    else:
        ds = part(0, cache, True).concatenate(part(cache, count, False))
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    if num_classes is not None:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    if mix is not None:
        def mixed(x, y):
            x, y = tf.numpy_function(mix, [x, y], (tf.float32, tf.float32), stateful=True)
            x.set_shape((None, image_size, image_size, 3))
            y.set_shape((None, num_classes))
            return x, y
        ds = ds.map(mixed, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


@functools.cache
def _image_batches_class():
    """The PyDataset subclass, defined on first use so that this module imports without Keras."""
    import keras

    class ImageBatches(keras.utils.PyDataset):
        """Batches decoded with Pillow in a thread pool; a new seeded order every epoch.

        While batch ``i`` is used, a background thread decodes batches ``i + 1 .. i + PREFETCH``.
        Only decoding runs ahead: augmentation and mixing run in order on the caller's thread,
        so their random draws are the same from run to run.
        """

        def __init__(self, images, image_size, batch_size, *, shuffle, augment, seed, num_classes, mix, cache):
            super().__init__()
            self.images, self.image_size, self.batch_size = images, image_size, batch_size
            self.shuffle, self.augment, self.num_classes, self.mix = shuffle, augment, num_classes, mix
            self._decoded: dict = {}  # index -> uint8 pixels, filled as batches are read, up to cache of them
            self._cache_limit = cache
            self._rng = np.random.default_rng(seed)
            self._order = np.arange(len(images))
            self._ahead: dict = {}  # batch index -> Future of its uint8 pixels, this epoch's order
            self._loader = None
            self.on_epoch_end()

        def __len__(self):
            return -(-len(self.images) // self.batch_size)

        def __getitem__(self, index):
            if not 0 <= index < len(self):
                raise IndexError(f"batch {index} out of range: there are {len(self)}")
            if self._loader is None:
                self._loader = ThreadPoolExecutor(1, thread_name_prefix="transferkit-prefetch")
            for ahead in range(index, min(index + PREFETCH + 1, len(self))):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._loader.submit(self._pixels, self._batch(ahead))
            for stale in [i for i in self._ahead if i < index]:  # skipped by a caller that jumped ahead
                self._ahead.pop(stale).cancel()
            pixels = self._ahead.pop(index).result().astype(np.float32)
            batch = self._batch(index)
            if self.augment is not None:
                pixels = keras.ops.convert_to_numpy(self.augment(pixels, training=True))
            labels = self.images.labels[batch].astype(np.int32)
            if self.num_classes is not None:
                labels = np.eye(self.num_classes, dtype=np.float32)[labels]
            if self.mix is not None:
                pixels, labels = self.mix(pixels, labels)
            return pixels, labels

        def _batch(self, index):
            return self._order[index * self.batch_size:(index + 1) * self.batch_size]

        def _pixels(self, batch):
            """The batch's uint8 pixels; decoded images are kept until ``cache`` of them are."""
            if not self._cache_limit:
                return load_images([self.images.paths[i] for i in batch], self.image_size)
            missing = [i for i in batch if i not in self._decoded]
            fresh = dict(zip(missing, load_images([self.images.paths[i] for i in missing], self.image_size)))
            for i in missing[:max(self._cache_limit - len(self._decoded), 0)]:
                self._decoded[i] = fresh[i]
            return np.stack([self._decoded[i] if i in self._decoded else fresh[i] for i in batch])

        def on_epoch_end(self):
            if self.shuffle:
                for future in self._ahead.values():  # decoded in the old order
                    future.cancel()
                self._ahead.clear()
                self._order = self._rng.permutation(len(self.images))

    return ImageBatches
