"""Random resized crop: the standard ImageNet training crop, as a Keras preprocessing layer.

Each image gets its own window covering a random fraction ``scale`` of its area with a random
aspect ratio (width / height) in ``ratio``, drawn log-uniformly, which is then resized back to the
image's own size (images arrive already resized to the recipe's ``image_size``). As torchvision's
``RandomResizedCrop``, up to 10 windows are drawn per image and the first that fits is kept;
when none fits, the first is clipped to the image.

In a recipe: ``random_resized_crop`` (scale 0.08..1, ratio 3/4..4/3), ``{random_resized_crop:
{scale: [0.35, 1.0], ratio: [0.75, 1.33]}}``, or a number, ``{random_resized_crop: 0.35}``: the
smallest fraction of the area kept, i.e. ``scale: [0.35, 1.0]``. A single ``ratio`` ``r`` means
between ``r`` and ``1/r``.

The layer is written with the backend ops of ``self.backend``, as Keras' own image layers are, so it
runs in a ``tf.data`` pipeline under any backend as well as inside a model.
"""

from __future__ import annotations

import math

import keras

# Keras exports no base class for its image preprocessing layers; this is the one RandomZoom and
# RandomCrop subclass, and what makes a layer safe in a tf.data pipeline under any backend.
from keras.src.layers.preprocessing.image_preprocessing.base_image_preprocessing_layer import (
    BaseImagePreprocessingLayer,
)

ATTEMPTS = 10  # windows drawn per image, as torchvision


def _range(value, name: str, of_number) -> tuple[float, float]:
    """``value`` as ``(low, high)`` with ``0 < low <= high``: two numbers as given, one through ``of_number``."""
    pair = of_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else value
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair) and 0 < pair[0] <= pair[1]):
        raise ValueError(f"{name} must be a number > 0 or two of them, low <= high; got {value!r}")
    return float(pair[0]), float(pair[1])


def _scale_range(scale) -> tuple[float, float]:
    """``(low, high)`` fractions of the area, ``high <= 1``; a number is the low end, up to 1."""
    low, high = _range(scale, "scale", lambda low: (low, 1.0))
    if high > 1:
        raise ValueError(f"scale is a fraction of the image area, at most 1; got {scale!r}")
    return low, high


def _ratio_range(ratio) -> tuple[float, float]:
    """``(low, high)`` widths / heights; a number ``r`` is ``r`` and ``1/r``, in order."""
    return _range(ratio, "ratio", lambda r: tuple(sorted((r, 1 / r))))


@keras.saving.register_keras_serializable(package="transferkit")
class RandomResizedCrop(BaseImagePreprocessingLayer):
    """Crops a random window of each image (area fraction ``scale``, aspect ``ratio``) and resizes
    it back to the image's size; in inference it passes images through.

    Args:
        scale: the window's fraction of the image area, ``(low, high)``, or a number: ``(number, 1)``.
        ratio: the window's width / height, ``(low, high)``, drawn log-uniformly, or a number
            ``r``: between ``r`` and ``1/r``.
        interpolation: ``"bilinear"`` or ``"nearest"``.
        seed: seed of the random draws.
        data_format: ``"channels_last"`` or ``"channels_first"``; default: Keras' setting.
        **kwargs: base layer arguments (``name``, ``dtype``).

    Example:
        >>> crop = RandomResizedCrop(scale=(0.35, 1.0), seed=0)
        >>> crop(np.zeros((8, 64, 64, 3)), training=True).shape  # windows resized back to 64 x 64
        (8, 64, 64, 3)
    """

    _USE_BASE_FACTOR = False

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear", seed=None,
                 data_format=None, **kwargs):
        super().__init__(data_format=data_format, **kwargs)
        self.scale, self.ratio = _scale_range(scale), _ratio_range(ratio)
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        self.interpolation = interpolation
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)
        self.supports_jit = False

    def get_random_transformation(self, data, training=True, seed=None):
        """Each image's window as fractions of its size: ``width``, ``height``, ``left``, ``top``,
        each of shape ``(batch, 1)``; None when not training."""
        if not training:
            return None
        ops = self.backend
        shape = ops.shape(data["images"] if isinstance(data, dict) else data)
        height, width = self._height_width(shape)
        batch = shape[0] if len(shape) == 4 else 1
        seed = self._get_seed_generator(ops._backend) if seed is None else seed
        area = ops.random.uniform((batch, ATTEMPTS), *self.scale, seed=seed)
        log_ratio = ops.random.uniform((batch, ATTEMPTS), *map(math.log, self.ratio), seed=seed)
        # window width / image width = sqrt(area * stretch), height likewise sqrt(area / stretch)
        stretch = ops.numpy.exp(log_ratio) * ops.cast(height, "float32") / ops.cast(width, "float32")
        widths, heights = ops.numpy.sqrt(area * stretch), ops.numpy.sqrt(area / stretch)
        fits = ops.cast(ops.numpy.logical_and(widths <= 1.0, heights <= 1.0), "int32")
        first = ops.numpy.expand_dims(ops.numpy.argmax(fits, axis=1), -1)  # 0 when none fits
        widths = ops.numpy.minimum(ops.numpy.take_along_axis(widths, first, axis=1), 1.0)
        heights = ops.numpy.minimum(ops.numpy.take_along_axis(heights, first, axis=1), 1.0)
        lefts = ops.random.uniform((batch, 1), 0.0, 1.0, seed=seed) * (1.0 - widths)
        tops = ops.random.uniform((batch, 1), 0.0, 1.0, seed=seed) * (1.0 - heights)
        return {"width": widths, "height": heights, "left": lefts, "top": tops}

    def _transform_images(self, images, transformation, interpolation):
        """Resample each window onto the full grid: output pixel ``x`` (centre ``x + 0.5``) reads
        input ``left + (x + 0.5) * width - 0.5``, and rows likewise; the identity when the window is
        the whole image."""
        if transformation is None:
            return images
        ops = self.backend
        height, width = (ops.cast(size, "float32") for size in self._height_width(ops.shape(images)))
        widths, heights = transformation["width"], transformation["height"]
        x_offsets = transformation["left"] * width + 0.5 * (widths - 1.0)
        y_offsets = transformation["top"] * height + 0.5 * (heights - 1.0)
        zeros = ops.numpy.zeros_like(widths)
        matrix = ops.numpy.concatenate([widths, zeros, x_offsets, zeros, heights, y_offsets, zeros, zeros], axis=1)
        return ops.image.affine_transform(images, transform=ops.cast(matrix, "float32"), interpolation=interpolation,
                                          fill_mode="nearest", data_format=self.data_format)

    def _height_width(self, shape):
        return (shape[-2], shape[-1]) if self.data_format == "channels_first" else (shape[-3], shape[-2])

    def transform_labels(self, labels, transformation, training=True):
        return labels

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "ratio": self.ratio,
                "interpolation": self.interpolation, "seed": self.seed}
