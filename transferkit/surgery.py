"""Network surgery: cut a backbone at named layers and pool what comes out.

Example:
    >>> body = create_backbone("mobilenet_v2")
    >>> features = cut(body, ["block_12_add", "top"])   # images -> concatenated pooled features
"""

from __future__ import annotations

import keras

from transferkit.backbones import resolve_layer
from transferkit.layers import HorizontalFlip, SignedSqrt

POOLING = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}


def cut(model: keras.Model, layers: str | list[str] = "top", pooling: str = "avg") -> keras.Model:
    """A model from the backbone's input to the globally pooled output(s) of ``layers``.

    Args:
        model: a backbone from :func:`transferkit.backbones.create_backbone`.
        layers: ``"top"`` (the last feature map), a layer name, or a list whose pooled outputs
            are concatenated in the order given.
        pooling: ``"avg"`` or ``"max"``.

    Returns:
        A ``keras.Model`` mapping raw images to a ``[batch, features]`` tensor.
    """
    names = [resolve_layer(model, name) for name in ([layers] if isinstance(layers, str) else layers)]
    pooled = [POOLING[pooling](name=f"{name}_{pooling}_pool")(model.get_layer(name).output) for name in names]
    outputs = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="features")(pooled)
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")


def average_over_flips(model: keras.Model) -> keras.Model:
    """A model whose output is the mean of ``model`` on each image and on its mirror image.

    Test-time augmentation built into the model, so training features, ``predict`` and exported
    models all see the same thing.
    """
    inputs = keras.Input(model.input_shape[1:], name="image")
    outputs = keras.layers.Average(name="flip_average")([model(inputs), model(HorizontalFlip(name="flip")(inputs))])
    return keras.Model(inputs, outputs, name=f"{model.name}_tta")


def power_normalize(model: keras.Model) -> keras.Model:
    """``model`` followed by a signed square root of each output value."""
    return keras.Model(model.inputs, SignedSqrt(name="power_norm")(model.output), name=f"{model.name}_sqrt")
