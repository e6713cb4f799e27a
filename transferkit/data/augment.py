"""Image augmentation from short specs, built from Keras 3's own preprocessing layers.

A spec is a name (``random_flip``), or a one-key mapping from a name to either the layer's main
argument (``{random_rotation: 0.1}``) or its keyword arguments (``{rand_augment: {factor: 0.5}}``).
Images are raw RGB in 0..255, so every layer that takes ``value_range`` gets ``(0, 255)``.

MixUp and CutMix mix labels too: :class:`BatchMixer` does them on whole batches (NumPy), after
the per-image layers. Keras is imported only when layers are built: :data:`AUGMENTATIONS` is a
plain table.
"""

from __future__ import annotations

import inspect
import threading

import numpy as np

from transferkit.errors import RecipeError, did_you_mean

#: spec name -> ``keras.layers`` class name
AUGMENTATIONS: dict[str, str] = {
    "random_flip": "RandomFlip",
    "random_rotation": "RandomRotation",
    "random_zoom": "RandomZoom",
    "random_translation": "RandomTranslation",
    "random_shear": "RandomShear",
    "random_perspective": "RandomPerspective",
    "random_elastic_transform": "RandomElasticTransform",
    "random_crop": "RandomCrop",
    "random_erasing": "RandomErasing",
    "random_contrast": "RandomContrast",
    "random_brightness": "RandomBrightness",
    "random_grayscale": "RandomGrayscale",
    "random_hue": "RandomHue",
    "random_saturation": "RandomSaturation",
    "random_color_jitter": "RandomColorJitter",
    "random_color_degeneration": "RandomColorDegeneration",
    "random_sharpness": "RandomSharpness",
    "random_gaussian_blur": "RandomGaussianBlur",
    "random_posterization": "RandomPosterization",
    "random_invert": "RandomInvert",
    "rand_augment": "RandAugment",
    "aug_mix": "AugMix",
    "solarization": "Solarization",
    "auto_contrast": "AutoContrast",
    "equalization": "Equalization",
}

VALUE_RANGE = (0, 255)
_NOT_ARGUMENTS = ("value_range", "seed", "data_format", "name")  # set here, not by a scalar


def parse_augment_spec(spec) -> tuple[str, dict]:
    """Split one spec into a name and keyword arguments.

    A scalar (or list) value fills the layer's required arguments (both sizes of ``random_crop``
    and ``random_translation``), else its ``factor``, else its first argument.

    Args:
        spec: ``"random_flip"``, ``{"random_flip": "horizontal"}`` or
            ``{"rand_augment": {"factor": 0.5}}``.

    Returns:
        ``(name, kwargs)``, e.g. ``("random_flip", {"mode": "horizontal"})``.

    Example:
        >>> parse_augment_spec({"random_rotation": 0.1})
        ('random_rotation', {'factor': 0.1})
    """
    if isinstance(spec, str):
        name, value = spec, None
    elif isinstance(spec, dict) and len(spec) == 1 and isinstance(next(iter(spec)), str):
        (name, value), = spec.items()
    else:
        raise RecipeError(f"augmentation: expected a name or {{name: arguments}}, e.g. random_flip or "
                          f"{{random_rotation: 0.1}}, got {spec!r}")
    if name not in AUGMENTATIONS:
        raise RecipeError(f"unknown augmentation {name!r}: {_did_you_mean(name, AUGMENTATIONS)}")
    if value is None:
        return name, {}
    if isinstance(value, dict):
        return name, dict(value)
    arguments = _arguments(name)
    required = [a for a, p in arguments.items() if p.default is inspect.Parameter.empty and a not in _NOT_ARGUMENTS]
    candidates = [a for a in arguments if a not in _NOT_ARGUMENTS]
    targets = required or (["factor"] if "factor" in candidates else candidates[:1])
    if not targets:
        raise RecipeError(f"augmentation {name!r} takes no main argument: give {{{name}: {{argument: value}}}} "
                          f"with arguments among {', '.join(arguments)}")
    return name, {target: value for target in targets}


def build_augmentation(specs, *, seed: int | None = None):
    """Build augmentation layers from specs, in order.

    Args:
        specs: specs (see :func:`parse_augment_spec`) or ready Keras layers; None or empty for no
            augmentation.
        seed: base seed; layer ``i`` gets ``seed + i`` unless its spec sets one.

    Returns:
        A ``keras.layers.Pipeline`` to call as ``pipeline(images, training=True)``, or None.
        (``Pipeline`` rather than ``Sequential``: it is a plain layer that stays ``tf.data``
        compatible under any backend, where ``Sequential`` converts inputs to backend tensors.)

    Raises:
        RecipeError: an unknown name or argument, or a value the layer rejects; its key is the
            spec's index, ``[i]``.
    """
    import keras

    if not specs:
        return None
    layers = []
    for i, spec in enumerate(specs):
        with RecipeError.under(f"[{i}]"):
            layers.append(spec if isinstance(spec, keras.layers.Layer)
                          else _layer(spec, None if seed is None else seed + i))
    return keras.layers.Pipeline(layers, name="augmentation")


def check_augmentation(specs) -> None:
    """Checks augmentation specs by building each layer once (cheap: no weights, no data).

    Raises:
        RecipeError: as :func:`build_augmentation`, keyed ``[i]``.
    """
    build_augmentation(specs)


def _layer(spec, seed: int | None):
    """The Keras layer of one spec, with ``value_range`` (0..255) and ``seed`` unless the spec sets them."""
    import keras

    name, kwargs = parse_augment_spec(spec)
    arguments = _arguments(name)
    _check_arguments(name, kwargs, arguments)
    if "value_range" in arguments:
        kwargs.setdefault("value_range", VALUE_RANGE)
    if "seed" in arguments and seed is not None:
        kwargs.setdefault("seed", seed)
    try:
        return getattr(keras.layers, AUGMENTATIONS[name])(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"augmentation {name!r}: {' '.join(str(err).split())}") from None


def _check_arguments(name: str, kwargs: dict, arguments: dict) -> None:
    """One-line RecipeError for an argument the layer does not take, or a required one not given."""
    for key in kwargs:
        if key not in arguments:
            raise RecipeError(f"augmentation {name!r}: unknown argument {key!r} ({_did_you_mean(key, arguments)})")
    for key, parameter in arguments.items():
        if parameter.default is inspect.Parameter.empty and key not in kwargs:
            raise RecipeError(f"augmentation {name!r}: missing argument {key!r}: "
                              f"give {{{name}: value}} or {{{name}: {{{key}: ...}}}}")


def _did_you_mean(word: str, choices) -> str:
    return did_you_mean(word, choices, f"choose from {', '.join(choices)}", show=repr)


def _arguments(name: str) -> dict[str, inspect.Parameter]:
    """The named constructor arguments (``self`` and ``**kwargs`` left out) of the layer behind ``name``."""
    import keras

    signature = inspect.signature(getattr(keras.layers, AUGMENTATIONS[name]).__init__)
    return {a: p for a, p in signature.parameters.items()
            if a != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


class BatchMixer:
    """MixUp and CutMix on a batch of images with one-hot labels; one of them per batch when both are on.

    MixUp blends each image with another of the batch, ``lam * x + (1 - lam) * x[perm]``; CutMix
    pastes a box of the other image covering ``1 - lam`` of the area. Labels mix in the same
    proportion, so soft targets match what the image shows. ``lam ~ Beta(alpha, alpha)``.

    Example:
        >>> mixer = BatchMixer(mixup=0.2, cutmix=1.0, seed=0)
        >>> pixels, labels = mixer(pixels, one_hot_labels)
    """

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0):
        if mixup < 0 or cutmix < 0 or not (mixup or cutmix):
            raise RecipeError(f"expected alphas >= 0, one of them > 0; got {mixup} and {cutmix}",
                              key="mixup / cutmix")
        self.kinds = [(kind, alpha) for kind, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # tf.data may call from several threads

    def __call__(self, pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            kind, alpha = self.kinds[self._rng.integers(len(self.kinds))]
            lam = float(self._rng.beta(alpha, alpha))
            perm = self._rng.permutation(len(pixels))
            box = _box(pixels.shape[1], pixels.shape[2], lam, self._rng) if kind == "cutmix" else None
        pixels, labels = np.array(pixels, copy=True), np.asarray(labels, dtype=np.float32)
        if box is None:
            mixed = lam * pixels + (1 - lam) * pixels[perm]
        else:
            top, bottom, left, right = box
            mixed = pixels
            mixed[:, top:bottom, left:right] = pixels[perm, top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (pixels.shape[1] * pixels.shape[2])
        return mixed.astype(pixels.dtype), (lam * labels + (1 - lam) * labels[perm]).astype(np.float32)


def _box(height: int, width: int, lam: float, rng) -> tuple[int, int, int, int]:
    """A box of about ``(1 - lam)`` of the image, centred uniformly at random, clipped to the image."""
    side = np.sqrt(1 - lam)
    cy, cx = rng.integers(height), rng.integers(width)
    half_h, half_w = int(height * side / 2), int(width * side / 2)
    return (max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width))
