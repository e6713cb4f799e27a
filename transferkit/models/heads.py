"""Classification heads: build one from plain keywords (or a function of the user's), attach it.

A classifier is one flat functional model: the backbone's own layers up to the cut, a pooling
layer named ``head_pool``, then the head, ending in a float32 softmax layer named
``probabilities``. Everything from ``head_pool`` on is the head (`head_layers`); everything before
it is the body (`transferkit.models.surgery.body_layers`).

A custom head is any function ``head(features, num_classes) -> probabilities`` taking the pooled
``[batch, features]`` tensor and returning class probabilities (end it in a softmax):

    >>> def my_head(features, num_classes):
    ...     x = keras.layers.Dense(512, activation="gelu")(features)
    ...     return keras.layers.Dense(num_classes, activation="softmax")(x)
    >>> model = attach_head(create_backbone("mobilenet_v2"), 5, custom=my_head)
    >>> model = attach_head(create_backbone("mobilenet_v2"), 5, layers=[{"dense": 256}], dropout=0.2)
"""

from __future__ import annotations

from typing import Callable

import keras

from transferkit.models.backbones import backbone_of, resolve_layer
from transferkit.errors import RecipeError
from transferkit.recipe import check_arguments, import_object
from transferkit.models.surgery import HEAD_POOL, POOLING, body_layers

HeadFunction = Callable[[keras.KerasTensor, int], keras.KerasTensor]

#: The custom-head protocol, quoted in error messages.
_HEAD_PROTOCOL = "a function head(features, num_classes) -> outputs"

#: A hidden layer of the built-in head: ``{"dense": units}`` and these, which have defaults.
DENSE_DEFAULTS = {"activation": "relu", "dropout": 0.0, "batch_norm": False}


def resolve_head(custom: str | HeadFunction | None) -> HeadFunction | None:
    """Turns a custom head into a head function, checking that it takes two arguments.

    Args:
        custom: None (the built-in head), a callable, or an import path ``package.module:function``
            (``package.module.function`` works too).

    Returns:
        The callable, or None.

    Raises:
        RecipeError: (key ``custom``) the path cannot be imported, or names something that is not a
            function of ``(features, num_classes)``.
    """
    if custom is None:
        return None
    if callable(custom):
        check_arguments(custom, 2, "custom", _HEAD_PROTOCOL)
        return custom
    return import_object(custom, "custom", _HEAD_PROTOCOL, arguments=2)


def check_head(*, layers=(), custom: str | HeadFunction | None = None) -> None:
    """Checks `build_head`'s ``layers`` and ``custom`` without building a model: the keys and
    activations of the layers, the custom head's signature (it is not called).

    Raises:
        RecipeError: keyed by the argument, e.g. ``layers[0].activation`` or ``custom``.
    """
    resolve_head(custom)
    for i, layer in enumerate(layers):
        _dense_layer(layer, key=f"layers[{i}]")


def build_head(features, num_classes: int, *, layers=(), dropout: float = 0.0, l1: float = 0.0, l2: float = 0.0,
               custom: str | HeadFunction | None = None):
    """The head on top of pooled features, ending in class probabilities.

    The built-in head is, for each of ``layers``, Dense (+ BatchNormalization) (+ Dropout), then
    Dropout(``dropout``), a Dense ``head_logits`` layer and a softmax named ``probabilities`` kept
    in float32 under mixed precision. Dense kernels get an L1/L2 penalty when ``l1`` or ``l2`` is
    set. Layer names start with ``head_``.

    Args:
        features: a ``[batch, features]`` Keras tensor.
        num_classes: number of classes.
        layers: the hidden layers, each a mapping ``{"dense": units}`` with optional
            ``activation`` (a ``keras.activations`` name, default relu), ``dropout`` (after the
            layer) and ``batch_norm``.
        dropout, l1, l2: dropout before the output layer; the kernel penalties.
        custom: a custom head (callable or import path) used instead of the built-in one, which
            then ignores the other keywords. It must return probabilities (end in a softmax).

    Returns:
        A ``[batch, num_classes]`` float32 tensor of class probabilities.

    Raises:
        RecipeError: keyed by the argument: an unknown activation (``layers[i].activation``), an
            import path that fails, or a custom head whose output is not ``[batch, num_classes]``
            (``custom``).
    """
    custom = resolve_head(custom)
    if custom is not None:
        outputs = _call_custom_head(custom, features, num_classes)
        # Identity, so both kinds of head end in a float32 layer named "probabilities".
        return keras.layers.Activation("linear", dtype="float32", name="probabilities")(outputs)
    regularizer = keras.regularizers.L1L2(l1, l2) if l1 or l2 else None
    x = features
    for i, layer in enumerate(layers, start=1):
        layer = _dense_layer(layer, key=f"layers[{i - 1}]")
        x = keras.layers.Dense(layer["dense"], layer["activation"], kernel_regularizer=regularizer,
                               name=f"head_dense_{i}")(x)
        if layer["batch_norm"]:
            x = keras.layers.BatchNormalization(name=f"head_batch_norm_{i}")(x)
        if layer["dropout"] > 0:
            x = keras.layers.Dropout(layer["dropout"], name=f"head_dropout_{i}")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, kernel_regularizer=regularizer, name="head_logits")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def attach_head(body: keras.Model, num_classes: int, *, layer: str = "top", pooling: str = "avg",
                **head) -> keras.Model:
    """A classifier: the body cut at ``layer``, pooled by ``pooling``, then the head.

    The result is flat: the body's layers appear in ``model.layers`` under their own names (they
    are the same layer objects, sharing weights with ``body``), followed by ``head_pool`` and the
    head. Freezing by layer name therefore works on it directly.

    Args:
        body: a backbone from `transferkit.models.backbones.create_backbone` (raw 0..255 pixels in), or
            any Keras model of your own: with ``layer="top"`` its output is the cut (a feature
            map is pooled, a feature vector used as it is).
        num_classes: number of classes.
        layer: where to cut: "top" (the last cut point) or a layer name of ``body``.
        pooling: ``avg``, ``max`` or ``flatten``.
        head: `build_head`'s keywords (``layers``, ``dropout``, ``l1``, ``l2``, ``custom``).

    Returns:
        A ``keras.Model`` named ``<body>_classifier`` from images to class probabilities.

    Raises:
        BackboneError: an unknown layer (with a did-you-mean).
        RecipeError: a bad head, as in `build_head`.
    """
    own = layer == "top" and backbone_of(body) is None  # a user's own network: its output is the cut
    cut = body.outputs[0] if own else body.get_layer(resolve_layer(body, layer)).output
    if len(cut.shape) == 2:  # already a feature vector: nothing to pool
        pool = keras.layers.Identity
    else:
        pool = keras.layers.Flatten if pooling == "flatten" else POOLING[pooling]
    outputs = build_head(pool(name=HEAD_POOL)(cut), num_classes, **head)
    return keras.Model(body.inputs[0], outputs, name=f"{body.name}_classifier")


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers `attach_head` added: ``head_pool`` and everything after it (what warm-up trains).

    Found by position, not by name, so a custom head's layers count whatever they are called.
    """
    return model.layers[len(body_layers(model)):]


def _call_custom_head(head: HeadFunction, features, num_classes: int):
    """Calls a custom head and checks that it returns one ``[batch, num_classes]`` tensor."""
    outputs = head(features, num_classes)
    shape = getattr(outputs, "shape", None)
    if shape is None or len(shape) != 2 or shape[-1] != num_classes:
        got = f"shape {tuple(shape)}" if shape is not None else f"a {type(outputs).__name__}"
        raise RecipeError(f"{getattr(head, '__name__', repr(head))} returned {got}, expected one tensor of shape "
                          f"(batch, {num_classes}): end it with keras.layers.Dense(num_classes, activation='softmax')",
                          key="custom")
    return outputs


def _dense_layer(layer, key: str) -> dict:
    """A hidden layer's mapping with its defaults filled in, its keys and activation checked."""
    unknown = sorted(set(layer) - {"dense", *DENSE_DEFAULTS})
    if unknown or "dense" not in layer:
        problem = f"unknown key {unknown[0]!r}" if unknown else "missing key 'dense'"
        raise RecipeError(f"{problem}: give {{dense: units}} and any of {', '.join(DENSE_DEFAULTS)}", key=key)
    layer = {**DENSE_DEFAULTS, **layer}
    try:
        keras.activations.get(layer["activation"])
    except ValueError:
        raise RecipeError(f"unknown activation {layer['activation']!r}: give a keras.activations name such as "
                          "relu, gelu, swish or tanh", key=f"{key}.activation") from None
    return layer
