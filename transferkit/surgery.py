"""Network surgery: cut a backbone at named layers and pool what comes out.

Example:
    >>> body = create_backbone("mobilenet_v2")
    >>> features = cut(body, ["block_12_add", "top"])   # images -> concatenated pooled features
"""

from __future__ import annotations

import keras

from transferkit.backbones import resolve_layer

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
