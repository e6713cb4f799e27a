"""Keras layers that transferkit puts into its models.

This module imports Keras at import time, so only import it where Keras is needed anyway
(`transferkit.models.backbones.create_backbone` does). Import it before
`keras.saving.load_model(...)` on a saved transferkit model so that `Preprocess` is registered.
"""

import keras
from keras import ops

#: ImageNet channel statistics used by `keras.applications.imagenet_utils.preprocess_input`.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

PREPROCESS_MODES = ("tf", "torch", "caffe", None)


@keras.saving.register_keras_serializable(package="transferkit")
class Preprocess(keras.layers.Layer):
    """Turns raw RGB pixels (0..255, channels last) into what an ImageNet backbone expects.

    The same arithmetic as `keras.applications.imagenet_utils.preprocess_input`, as a layer
    written with `keras.ops` only, so it is saved with the model and runs on every backend.

    Args:
        mode: `"tf"` (x / 127.5 - 1), `"torch"` (x / 255, then ImageNet mean / std per channel),
            `"caffe"` (RGB -> BGR, then minus the ImageNet mean pixel), or `None` (identity:
            for backbones that normalise inside the Keras model, such as EfficientNet).
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Example:
        >>> x = keras.Input((224, 224, 3))
        >>> y = Preprocess("tf", name="preprocess")(x)
    """

    def __init__(self, mode=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"Preprocess mode must be one of {PREPROCESS_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="transferkit")
class HorizontalFlip(keras.layers.Layer):
    """Mirrors images left to right (deterministic; used for test-time augmentation)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=2)


#: Where :class:`CropResize` may take its window from.
CROP_CORNERS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


@keras.saving.register_keras_serializable(package="transferkit")
class CropResize(keras.layers.Layer):
    """A fixed window of ``fraction`` of each side, at ``corner``, resized back to the image's size
    (deterministic; the views of five-crop test-time augmentation)."""

    def __init__(self, corner="center", fraction=0.875, **kwargs):
        super().__init__(**kwargs)
        if corner not in CROP_CORNERS or not 0 < fraction <= 1:
            raise ValueError(f"CropResize needs a corner among {CROP_CORNERS} and 0 < fraction <= 1, "
                             f"got {corner!r} and {fraction!r}")
        self.corner, self.fraction = corner, float(fraction)

    def call(self, inputs):
        height, width = int(inputs.shape[1]), int(inputs.shape[2])
        crop_h, crop_w = max(1, round(height * self.fraction)), max(1, round(width * self.fraction))
        top = {"center": (height - crop_h) // 2, "top": 0, "bottom": height - crop_h}[self.corner.split("_")[0]]
        left = {"left": 0, "right": width - crop_w}.get(self.corner.split("_")[-1], (width - crop_w) // 2)
        window = inputs[:, top:top + crop_h, left:left + crop_w, :]
        return ops.image.resize(ops.cast(window, self.compute_dtype), (height, width), interpolation="bilinear")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "corner": self.corner, "fraction": self.fraction}


@keras.saving.register_keras_serializable(package="transferkit")
class SignedSqrt(keras.layers.Layer):
    """Power normalisation: sign(x) * sqrt(|x|), which evens out bursty pooled features."""

    def call(self, inputs):
        return keras.ops.sign(inputs) * keras.ops.sqrt(keras.ops.abs(inputs))


@keras.saving.register_keras_serializable(package="transferkit")
class TemperatureScaling(keras.layers.Layer):
    """Calibrates class probabilities: ``softmax(log p / temperature)``, computed in float32.

    For a softmax model ``log p`` is the logits up to a constant, so this is temperature scaling of
    the logits, put after the model's output (see :mod:`transferkit.reports.calibration`).
    """

    def __init__(self, temperature=1.0, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        if not temperature > 0:
            raise ValueError(f"TemperatureScaling temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def call(self, inputs):
        x = ops.log(ops.clip(ops.cast(inputs, "float32"), 1e-12, 1.0)) / self.temperature
        return ops.softmax(x, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
