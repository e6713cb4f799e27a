"""The seeds of every random draw in training: each comes from the recipe's seed, a stream and a key
(an epoch, a batch) alone, so that a resumed run draws what an uninterrupted one drew
(see :mod:`transferkit.data.pipelines`)."""

from __future__ import annotations

import numpy as np

# independent random streams derived from one seed (see draw_seeds)
ORDER, AUGMENT, MIX, MODEL, BACKEND = range(5)


def draw_seeds(seed: int, stream: int, *key: int, count: int = 1) -> np.ndarray:
    """``count`` seeds in [1, 2**31) that depend on ``(seed, stream, *key)`` alone (NumPy's SeedSequence)."""
    words = np.random.SeedSequence([seed % 2**32, stream, *key]).generate_state(count)
    return (words.astype(np.int64) & 0x7FFFFFFF) | 1


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``count`` images in training epoch ``epoch`` (0-based)."""
    return np.random.default_rng(draw_seeds(seed, ORDER, epoch)[0]).permutation(count)


def seed_states(layer) -> list:
    """The random generator states (Keras ``SeedGenerator``) of ``layer`` and everything in it, in a
    fixed order: what dropout and the random augmentation layers draw from."""
    return [variable for variable in layer.variables if variable.name == "seed_generator_state"]


def reseed(states: list, seed: int, stream: int, *key: int) -> None:
    """Set each generator state to its own seed derived from ``(seed, stream, *key)``, so the draws
    that follow depend on that key alone."""
    for state, value in zip(states, draw_seeds(seed, stream, *key, count=len(states))):
        state.assign(np.array([value, 0], dtype=state.dtype))


def reseed_backend(seed: int, *key: int) -> None:
    """Seed the backend's global generator from ``(seed, *key)``. Under PyTorch, a Keras layer built
    without a seed (dropout in a head or a backbone) draws from ``torch``'s global generator, not
    from a generator state that :func:`reseed` can set."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(int(draw_seeds(seed, BACKEND, *key)[0]))
