"""Image augmentation from short specs, built from Keras 3's own preprocessing layers, or any Keras
layer named by its import path.

A spec is a name (``random_flip``), or a one-key mapping from a name to either the layer's main
argument (``{random_rotation: 0.1}``) or its keyword arguments (``{rand_augment: {factor: 0.5}}``).
A name is a short name of :data:`AUGMENTATIONS` or the import path of a ``keras.layers.Layer``
class, or of a function returning a layer: ``package.module:Class`` or ``package.module.Class``,
e.g. ``{keras_cv.layers.GridMask: {ratio_factor: 0.3}}``. Images are raw RGB in 0..255, so every
layer whose constructor takes ``value_range`` gets ``(0, 255)``, and one that takes ``seed`` gets
its own, unless the spec sets them. ``random_resized_crop`` is transferkit's own layer
(:mod:`transferkit.data.crops`); its main argument is the smallest area fraction kept.

MixUp and CutMix mix labels too: :class:`BatchMixer` does them on whole batches (NumPy), after
the per-image layers. Keras is imported only when layers are built: :data:`AUGMENTATIONS` is a
plain table.
"""

from __future__ import annotations

import importlib.util
import inspect
import threading

import numpy as np

from transferkit.errors import RecipeError, did_you_mean

#: spec name -> import path of its layer class
AUGMENTATIONS: dict[str, str] = {
    "random_flip": "keras.layers.RandomFlip",
    "random_rotation": "keras.layers.RandomRotation",
    "random_zoom": "keras.layers.RandomZoom",
    "random_translation": "keras.layers.RandomTranslation",
    "random_shear": "keras.layers.RandomShear",
    "random_perspective": "keras.layers.RandomPerspective",
    "random_elastic_transform": "keras.layers.RandomElasticTransform",
    "random_crop": "keras.layers.RandomCrop",
    "random_resized_crop": "transferkit.data.crops:RandomResizedCrop",
    "random_erasing": "keras.layers.RandomErasing",
    "random_contrast": "keras.layers.RandomContrast",
    "random_brightness": "keras.layers.RandomBrightness",
    "random_grayscale": "keras.layers.RandomGrayscale",
    "random_hue": "keras.layers.RandomHue",
    "random_saturation": "keras.layers.RandomSaturation",
    "random_color_jitter": "keras.layers.RandomColorJitter",
    "random_color_degeneration": "keras.layers.RandomColorDegeneration",
    "random_sharpness": "keras.layers.RandomSharpness",
    "random_gaussian_blur": "keras.layers.RandomGaussianBlur",
    "random_posterization": "keras.layers.RandomPosterization",
    "random_invert": "keras.layers.RandomInvert",
    "rand_augment": "keras.layers.RandAugment",
    "aug_mix": "keras.layers.AugMix",
    "solarization": "keras.layers.Solarization",
    "auto_contrast": "keras.layers.AutoContrast",
    "equalization": "keras.layers.Equalization",
}

VALUE_RANGE = (0, 255)
_NOT_ARGUMENTS = ("value_range", "seed", "data_format", "name")  # set here, not by a scalar


def parse_augment_spec(spec) -> tuple[str, dict]:
    """Split one spec into a name (a short name or an import path) and keyword arguments.

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
    if name not in AUGMENTATIONS and not is_import_path(name):
        raise RecipeError(f"unknown augmentation {name!r}: " + did_you_mean(
            name, AUGMENTATIONS, f"choose from {', '.join(AUGMENTATIONS)}, or give the import path of a Keras "
                                 f"layer class (package.module:Class)", show=repr))
    if value is None:
        return name, {}
    if isinstance(value, dict):
        return name, dict(value)
    arguments = _arguments(_factory(name))
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


def is_import_path(name: str) -> bool:
    """Whether an augmentation name is an import path (``package.module:Class`` or dotted), not a short name."""
    return "." in name or ":" in name


def _layer(spec, seed: int | None):
    """The Keras layer of one spec, with ``value_range`` (0..255) and ``seed`` unless the spec sets them."""
    import keras

    name, kwargs = parse_augment_spec(spec)
    factory = _factory(name)
    arguments = _arguments(factory)
    _check_arguments(name, kwargs, arguments)
    if "value_range" in arguments:
        kwargs.setdefault("value_range", VALUE_RANGE)
    if "seed" in arguments and seed is not None:
        kwargs.setdefault("seed", seed)
    try:
        layer = factory(**kwargs)
    except Exception as error:  # noqa: BLE001 - whatever the layer rejects is reported in one line
        raise RecipeError(f"augmentation {name!r}: {_one_line(error)}") from None
    if not isinstance(layer, keras.layers.Layer):
        raise RecipeError(f"augmentation {name!r}: returned {_described(layer)}, not a keras.layers.Layer: "
                          f"give a function that returns a layer, or the layer's class")
    return layer


def _factory(name: str):
    """The ``keras.layers.Layer`` class, or function returning a layer, that a short name or an import path names."""
    import keras

    found = _import(AUGMENTATIONS.get(name, name), name)
    layer_class = isinstance(found, type) and issubclass(found, keras.layers.Layer)
    if not layer_class and (isinstance(found, (type, keras.layers.Layer)) or not callable(found)):
        raise RecipeError(f"augmentation {name!r}: {_described(found)}, not a keras.layers.Layer class: "
                          f"give the import path of a layer class (or of a function returning a layer)")
    return found


def _import(path: str, name: str):
    """The object at ``package.module:attribute`` or ``package.module.attribute``; a one-line
    RecipeError that says what to install or fix when it cannot be imported."""
    module_name, colon, attribute = path.partition(":")
    if not colon:
        module_name, _, attribute = module_name.rpartition(".")
    if not module_name or not attribute:
        raise RecipeError(f"augmentation {name!r}: give the layer class as package.module:Class "
                          f"or package.module.Class")
    try:
        found = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise RecipeError(f"augmentation {name!r}: {_not_installed(error.name or module_name)}") from None
    except Exception as error:  # noqa: BLE001 - a broken user module is reported in one line too
        raise RecipeError(f"augmentation {name!r}: cannot import {module_name} "
                          f"({type(error).__name__}: {_one_line(error)}): fix that module") from None
    where = module_name
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise RecipeError(f"augmentation {name!r}: {where} has no {part!r}: "
                              + did_you_mean(part, [n for n in dir(found) if not n.startswith("_")],
                                             "check the name", show=repr))
        found, where = getattr(found, part), f"{where}.{part}"
    return found


def _not_installed(module: str) -> str:
    """What to do about a module that cannot be found: install its package, or fix the path within one."""
    package = module.partition(".")[0]
    try:
        installed = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        return f"no module {module!r} in the installed package {package!r}: fix the path"
    return (f"no module named {package!r}: install it (pip install {package.replace('_', '-')}) "
            f"or put it on the Python path")


def _described(value) -> str:
    """``value`` in the words of an error message: "the class x.Y", "a RandomFlip layer instance",
    "an object of type int"."""
    import keras

    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    if isinstance(value, keras.layers.Layer):
        return f"a {type(value).__name__} layer instance"
    return f"an object of type {type(value).__name__}"


def _one_line(error) -> str:
    return " ".join(str(error).split())


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


def _arguments(factory) -> dict[str, inspect.Parameter]:
    """The named arguments (``self``, ``*args`` and ``**kwargs`` left out) of a layer class's
    constructor, or of a function returning a layer; none when Python cannot read its signature."""
    try:
        signature = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
    except (TypeError, ValueError):
        return {}
    return {a: p for a, p in signature.parameters.items() if a != "self"
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


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
