"""The device side: whether there is a GPU, and what follows from it.

Mixed precision and augmentation placement default by it (``auto``), ``distribute: data_parallel``
spreads batches over every local device, and running out of device memory is recognised on every
backend so that it can be reported as a one-line error.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

from transferkit.errors import RecipeError

log = logging.getLogger("transferkit")


def gpu_available() -> bool:
    """Whether the Keras backend sees a GPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return any(device.platform == "gpu" for device in jax.devices())
    if backend == "torch":
        import torch
        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf
        return bool(tf.config.list_physical_devices("GPU"))
    return False


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for a recipe's ``precision``: ``auto`` is bfloat16 on a GPU, else float32."""
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if gpu_available() else "float32"


@contextmanager
def distribution(kind: str):
    """Data-parallel training over every local device: Keras' DataParallel under JAX, a
    MirroredStrategy under TensorFlow; in a multi-host run (:mod:`transferkit.training.multihost`)
    over the devices of all processes, whatever ``kind``. The recipe's batch size is the global batch."""
    import keras

    from transferkit.training.multihost import process_count

    if kind != "data_parallel" and process_count() == 1:
        yield
        return
    backend = keras.backend.backend()
    if backend == "jax":
        previous = keras.distribution.distribution()
        devices = keras.distribution.list_devices()
        # each process reads its own share of the batches (transferkit.data.shards), not Keras' tf.data shard
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
        log.info("data parallel over %d devices: %s", len(devices), ", ".join(devices))
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)
    elif backend == "tensorflow":
        strategy = _mirrored_strategy()
        log.info("data parallel over %d devices (MirroredStrategy)", strategy.num_replicas_in_sync)
        with strategy.scope():
            yield
    else:
        raise RecipeError(f"distribute: data_parallel runs under the jax or tensorflow backend, not {backend}: "
                          "set KERAS_BACKEND=jax, or distribute: none")


@functools.cache
def _mirrored_strategy():
    """A MirroredStrategy over the GPUs, or over the logical CPUs where there are none."""
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


@contextmanager
def dtype_policy(name: str):
    """Build layers under a Keras dtype policy, then put the previous one back."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def augment_placement(augment_on: str) -> str:
    """Where augmentation runs, ``"pipeline"`` or ``"model"``; ``auto`` is the cheaper place.

    ``auto`` is ``model`` on a GPU, where the layers run on the device inside the compiled
    training step and the CPU only decodes, and ``pipeline`` on the CPU, where the step already
    keeps every core busy and the input pipeline's thread costs least
    (``benchmarks/augment_placement.py`` measures both).
    """
    if augment_on != "auto":
        return augment_on
    return "model" if gpu_available() else "pipeline"


def out_of_memory(error: BaseException) -> bool:
    """Whether an exception from training or a forward pass is the device running out of memory (any backend)."""
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in ("ResourceExhausted", "RESOURCE_EXHAUSTED", "OutOfMemoryError",
                                         "out of memory", "Out of memory"))
