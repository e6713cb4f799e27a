"""Input pipelines: an :class:`~transferkit.data.sources.ImageSet` in, batches of float32 RGB pixels (0..255) out.

Two pipelines give the same batches: ``tf.data`` under Keras' TensorFlow backend, and a
``keras.utils.PyDataset`` (Pillow in a thread pool) everywhere else, so JAX and PyTorch machines
need no TensorFlow. Both decode in parallel, prefetch, and keep decoded images in memory up to a bound.

Training data can be made a function of ``(seed, epoch)`` alone (``make_dataset(..., epochs=...)``):
each epoch's order, every augmentation draw and every MixUp/CutMix draw come from seeds derived from
the recipe's seed, the epoch and the batch, never from what the pipeline did before. A run resumed
after epoch 2 therefore sees exactly the batches an uninterrupted run saw from epoch 3 on.

TensorFlow and Keras are imported inside the functions that need them, never at module level.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from transferkit.data.balance import balanced_order, sample_weights
from transferkit.data.decode import load_image
from transferkit.data.seeds import AUGMENT, MIX, draw_seeds, epoch_order, reseed, seed_states
from transferkit.data.sources import ImageSet

log = logging.getLogger("transferkit")

PIPELINES = ("auto", "tf", "pydataset")
CACHE_FRACTION = 0.25  # cache: auto keeps decoded images in memory up to this share of the RAM
PREFETCH = 2  # batches the PyDataset pipeline decodes ahead


def make_dataset(images: ImageSet, image_size: int, batch_size: int = 32, *, shuffle: bool = False,
                 augment=None, seed: int = 0, pipeline: str = "auto", num_classes: int | None = None,
                 mix=None, cache: bool | int | str = False, epochs: range | None = None, class_weight=None,
                 balanced: bool = False, shard=None):
    """Batches of ``(pixels float32 [B, S, S, 3] in 0..255, labels int32 [B][, sample weights float32 [B]])`` for Keras.

    Args:
        images: the images.
        image_size: side ``S`` of the square images.
        batch_size: images per batch (the last batch of an epoch may be smaller).
        shuffle: draw a new order every epoch (seeded).
        augment: a Keras layer applied to each batch in training mode (see
            :func:`transferkit.data.augment.build_augmentation`), or None.
        seed: random state of the shuffle, augmentation and mixing.
        pipeline: ``"tf"`` (``tf.data``), ``"pydataset"`` (``keras.utils.PyDataset``, no TensorFlow
            needed) or ``"auto"``: ``"tf"`` under Keras' TensorFlow backend when TF is installed.
        num_classes: give it for one-hot float32 labels ``[B, num_classes]`` instead.
        mix: ``mix(seed=...) -> mixer`` where a mixer maps ``(pixels, one_hot) -> (pixels, one_hot)`` in
            NumPy after ``augment``, e.g. ``functools.partial(BatchMixer, 0.2)`` (see
            :class:`transferkit.data.augment.BatchMixer`); needs ``num_classes``.
        cache: keep decoded images (uint8) in memory from the first epoch on: True (all), False
            (none), a number of images (at most that many), or "auto" (as many as fit in
            :data:`CACHE_FRACTION` of the physical memory). The images beyond the bound are
            decoded again every epoch.
        epochs: training epochs, e.g. ``range(2, 6)`` (0-based): the dataset yields those epochs'
            batches back to back, shuffled, each epoch a function of ``(seed, epoch)`` alone; give
            ``Model.fit`` ``steps_per_epoch=steps_per_epoch(len(images), batch_size)``.
        class_weight: one weight per label: batches then carry the samples' weights (``sample_weights``).
        balanced: balanced sampling (needs ``epochs``): each epoch draws as many images as there are,
            with replacement, each class equally likely (:func:`~transferkit.data.balance.balanced_order`).
        shard: a :class:`~transferkit.data.shards.Shard`: only this process's share of each batch
            (a multi-process run; the ``pydataset`` pipeline), ``steps_per_epoch(..., shard)`` of them.

    Returns:
        A ``tf.data.Dataset`` or a ``keras.utils.PyDataset``; both work with ``Model.fit`` and
        ``Model.predict`` and give identical un-augmented batches.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if pipeline == "auto":
        pipeline = "tf" if _tensorflow_backend() else "pydataset"
    if shard is not None and pipeline == "tf":
        raise ValueError("a shard is read by the pydataset pipeline only")
    if mix is not None and num_classes is None:
        raise ValueError("mix needs one-hot labels: give num_classes too")
    if balanced and epochs is None:
        raise ValueError("balanced sampling draws each epoch's images by its seed: give epochs too")
    build = _tf_dataset if pipeline == "tf" else _image_batches_class()
    return build(_Source(images, image_size, batch_size, seed, cache_limit(cache, len(images), image_size),
                         None if class_weight is None else np.asarray(class_weight, np.float32), shard, balanced),
                 shuffle=shuffle or epochs is not None, augment=augment, num_classes=num_classes, mix=mix,
                 epochs=None if epochs is None else list(epochs))


def steps_per_epoch(count: int, batch_size: int, shard=None) -> int:
    """Batches in an epoch of ``count`` images (split over processes by ``shard``: see its ``batches``)."""
    return -(-count // batch_size) if shard is None else shard.batches(count, batch_size)


def fitting_batch_size(batch_size: int, count: int, split: str = "training") -> int:
    """``batch_size``, or ``count`` where it is larger: one batch then holds the whole split, as it
    would with the larger size, without asking the pipeline for a batch of that size."""
    if batch_size <= count:
        return batch_size
    log.info("data.batch_size %d is more than the %d %s images: using %d (one batch per epoch)",
             batch_size, count, split, count)
    return count


def cache_limit(cache: bool | int | str, count: int, image_size: int) -> int:
    """How many of ``count`` decoded images to keep in memory for ``cache`` (see :func:`make_dataset`)."""
    if isinstance(cache, bool):
        return count if cache else 0
    if cache != "auto":
        return max(0, min(int(cache), count))
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: do not risk it
        return 0
    return min(count, int(CACHE_FRACTION * memory) // (image_size * image_size * 3))


def _tensorflow_backend() -> bool:
    import importlib.util

    import keras

    return importlib.util.find_spec("tensorflow") is not None and keras.backend.backend() == "tensorflow"


class _Source:
    """What both pipelines share: the images, their order per epoch, and the decoded-image cache."""

    def __init__(self, images: ImageSet, image_size: int, batch_size: int, seed: int, cache: int, class_weight=None,
                 shard=None, balanced: bool = False):
        self.images, self.image_size, self.seed, self.class_weight, self.shard, self.balanced = \
            images, image_size, seed, class_weight, shard, balanced
        # a batch larger than the set is the whole set: the same batches, no pipeline asked for more
        self.batch_size = max(1, min(int(batch_size), len(images)))
        self.labels = np.asarray(images.labels, dtype=np.int32)
        self.per_epoch = steps_per_epoch(len(images), self.batch_size, shard)
        self._cache_limit, self._decoded, self._lock = cache, {}, threading.Lock()
        self._pool = None

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, indices) -> np.ndarray:
        """uint8 ``[len(indices), S, S, 3]``; decoded images are kept until ``cache`` of them are."""
        indices = [int(i) for i in indices]
        missing = [i for i in dict.fromkeys(indices) if i not in self._decoded]
        if missing:
            if self._pool is None:
                with self._lock:
                    self._pool = self._pool or ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="transferkit-decode")
            paths = [self.images.paths[i] for i in missing]
            fresh = dict(zip(missing, self._pool.map(lambda path: load_image(path, self.image_size), paths)))
            with self._lock:
                for i in missing[:max(self._cache_limit - len(self._decoded), 0)]:
                    self._decoded[i] = fresh[i]
        else:
            fresh = {}
        if not indices:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return np.stack([self._decoded[i] if i in self._decoded else fresh[i] for i in indices])

    def order(self, epoch: int) -> np.ndarray:
        """The images of training epoch ``epoch``: a permutation, or a balanced draw."""
        if self.balanced:
            return balanced_order(self.labels, self.seed, epoch)
        return epoch_order(len(self), self.seed, epoch)

    def mix_seed(self, epoch: int, batch: int) -> int:
        return int(draw_seeds(self.seed, MIX, epoch, batch, *self.process)[0])

    @property
    def process(self) -> tuple:
        """The key of this process's draws beside ``(epoch, batch)``: its shard's index (each share of a
        global batch draws its own augmentation and mixing), or nothing when it is the only process."""
        return () if self.shard is None else (self.shard.index,)


def _tf_dataset(source: _Source, *, shuffle, augment, num_classes, mix, epochs):
    """batches of indices -> Pillow decode (threads, cache) -> float32 -> augment -> one-hot, mix -> weights
    -> prefetch. With ``epochs`` each batch carries ``(epoch, batch)`` and every draw is keyed by it."""
    import tensorflow as tf

    count, batch_size, labels = len(source), source.batch_size, source.labels

    def load(indices):
        pixels = tf.numpy_function(source.pixels, [indices], tf.uint8, stateful=False)
        pixels.set_shape((None, source.image_size, source.image_size, 3))
        return tf.cast(pixels, tf.float32), tf.gather(labels, indices)

    if epochs is None:
        order = tf.data.Dataset.range(count)
        if shuffle:
            order = order.shuffle(max(count, 1), seed=source.seed, reshuffle_each_iteration=True)
        ds = order.batch(batch_size).map(lambda indices: (-1, -1, *load(indices)), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        def one_epoch(epoch):
            order = tf.numpy_function(lambda e: source.order(int(e)).astype(np.int64), [epoch], tf.int64)
            order.set_shape((count,))
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate().map(
                lambda batch, indices: (epoch, batch, indices))
        ds = tf.data.Dataset.from_tensor_slices(np.array(epochs, np.int64)).flat_map(one_epoch)
        ds = ds.map(lambda epoch, batch, indices: (epoch, batch, *load(indices)), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        ds = ds.map(_tf_augment(augment, source.seed, keyed=epochs is not None),
                    num_parallel_calls=None if epochs is not None else tf.data.AUTOTUNE)
    if num_classes is not None:
        ds = ds.map(lambda e, b, x, y: (e, b, x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    if mix is not None:
        mixer = mix(seed=source.seed) if epochs is None else None

        def mix_batch(epoch, batch, pixels, one_hot):
            return (mixer or mix(seed=source.mix_seed(int(epoch), int(batch))))(pixels, one_hot)

        def mixed(e, b, x, y):
            x, y = tf.numpy_function(mix_batch, [e, b, x, y], (tf.float32, tf.float32), stateful=epochs is None)
            x.set_shape((None, source.image_size, source.image_size, 3))
            y.set_shape((None, num_classes))
            return e, b, x, y
        ds = ds.map(mixed, num_parallel_calls=tf.data.AUTOTUNE)
    if source.class_weight is not None:  # a third element: the samples' weights, which Model.fit reads as such
        weigh = functools.partial(sample_weights, class_weight=source.class_weight)
        ds = ds.map(lambda e, b, x, y: (e, b, x, y, tf.ensure_shape(
            tf.numpy_function(weigh, [y], tf.float32, stateful=False), (None,))), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda e, b, x, y, *weights: (x, y, *weights)).prefetch(tf.data.AUTOTUNE)


def _tf_augment(augment, seed: int, keyed: bool):
    """The ``tf.data`` map function that augments a batch. Keyed, it first sets the layers'
    generator states from ``(seed, epoch, batch)``: the map then runs batch after batch (one
    thread), so that no other batch moves the states in between. (Under another Keras backend the
    layers draw from TensorFlow generators of their own, which are not keyed.)"""
    import tensorflow as tf

    states = seed_states(augment) if keyed and _tensorflow_backend() else []

    def augmented(epoch, batch, pixels, labels):
        if states:
            values = tf.numpy_function(lambda e, b: draw_seeds(seed, AUGMENT, int(e), int(b), count=len(states)),
                                       [epoch, batch], tf.int64, stateful=False)
            for i, state in enumerate(states):  # dataset functions run their stateful ops in order
                state.assign(tf.cast(tf.stack([values[i], 0]), state.dtype))
        return epoch, batch, augment(pixels, training=True), labels

    return augmented


class _Batches:
    """Batches decoded with Pillow in a thread pool; a new seeded order every epoch: the
    ``keras.utils.PyDataset`` pipeline (see :func:`_image_batches_class`), without Keras.

    While batch ``i`` is used, a background thread decodes batches ``i + 1 .. i + PREFETCH``.
    Only decoding runs ahead: augmentation and mixing run in order on the caller's thread,
    so their random draws are the same from run to run.
    """

    def __init__(self, source: _Source, *, shuffle, augment, num_classes, mix, epochs):
        super().__init__()
        self.source, self.shuffle, self.augment, self.num_classes, self.epochs = \
            source, shuffle, augment, num_classes, epochs
        self._mix, self._mixer = mix, (mix(seed=source.seed) if mix is not None and epochs is None else None)
        self._states = seed_states(augment) if augment is not None and epochs is not None else []
        self._rng = np.random.default_rng(source.seed)
        self._order = np.arange(len(source))
        self._orders: dict = {}  # epoch -> its order (the current and the next)
        self._ahead: dict = {}  # batch index -> Future of its uint8 pixels
        self._loader = None
        self.on_epoch_end()

    def __len__(self):
        return self.source.per_epoch * (len(self.epochs) if self.epochs is not None else 1)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: there are {len(self)}")
        pixels = self._decoded(index).astype(np.float32)
        epoch, batch, indices = self._plan(index)
        if self.augment is not None:
            pixels = self._augmented(pixels, epoch, batch)
        labels = self.source.labels[indices]
        if self.num_classes is not None:
            labels = np.eye(self.num_classes, dtype=np.float32)[labels]
        if self._mix is not None:
            mixer = self._mixer or self._mix(seed=self.source.mix_seed(epoch, batch))
            pixels, labels = mixer(pixels, labels)
        weights = self.source.class_weight
        return (pixels, labels) if weights is None else (pixels, labels, sample_weights(labels, weights))

    def _decoded(self, index) -> np.ndarray:
        """The uint8 pixels of batch ``index``, once the batches after it are decoding in the background."""
        if self._loader is None:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="transferkit-prefetch")
        for ahead in range(index, min(index + PREFETCH + 1, len(self))):
            if ahead not in self._ahead:
                self._ahead[ahead] = self._loader.submit(self.source.pixels, self._plan(ahead)[2])
        for stale in [i for i in self._ahead if i < index]:  # skipped by a caller that jumped ahead
            self._ahead.pop(stale).cancel()
        return self._ahead.pop(index).result()

    def _augmented(self, pixels: np.ndarray, epoch: int, batch: int) -> np.ndarray:
        """``augment`` in training mode; keyed, its generator states first set from ``(seed, epoch, batch)``."""
        import keras

        if self._states:
            reseed(self._states, self.source.seed, AUGMENT, epoch, batch, *self.source.process)
        return keras.ops.convert_to_numpy(self.augment(pixels, training=True))

    def _plan(self, index):
        """``(epoch, batch in the epoch, image indices)`` of batch ``index`` (this process's share with a shard)."""
        size, per_epoch, shard = self.source.batch_size, self.source.per_epoch, self.source.shard
        if self.epochs is None:
            epoch, batch, order = -1, index, self._order
        else:
            epoch, batch = self.epochs[index // per_epoch], index % per_epoch
            if epoch not in self._orders:
                self._orders = {e: o for e, o in self._orders.items() if e > epoch - 2}
                self._orders[epoch] = self.source.order(epoch)
            order = self._orders[epoch]
        indices = order[batch * size:(batch + 1) * size]
        return epoch, batch, indices if shard is None else shard.take(indices)

    def on_epoch_end(self):
        if self.shuffle and self.epochs is None:
            for future in self._ahead.values():  # decoded in the old order
                future.cancel()
            self._ahead.clear()
            self._order = self._rng.permutation(len(self.source))


@functools.cache
def _image_batches_class():
    """The PyDataset pipeline's class, defined on first use so that this module imports without Keras."""
    import keras

    class ImageBatches(_Batches, keras.utils.PyDataset):
        """The batches of :class:`_Batches` as a ``keras.utils.PyDataset``."""

    return ImageBatches
