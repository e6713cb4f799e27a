"""Network surgery: cut a backbone at named layers and pool what comes out; freeze and unfreeze.

Example:
    >>> body = create_backbone("mobilenet_v2")
    >>> features = cut(body, ["block_12_add", "top"])   # images -> concatenated pooled features
    >>> model = attach_head(body, 5, dropout=0.2)         # transferkit.models.heads
    >>> unfreeze(model, top_blocks=2)                     # ['block_16_expand', ..., 'Conv_1']
"""

from __future__ import annotations

import math

import keras

from transferkit.models.backbones import backbone_of, resolve_layer
from transferkit.models.registry import BackboneInfo
from transferkit.errors import BackboneError, RecipeError
from transferkit.models.layers import CROP_CORNERS, CropResize, HorizontalFlip, SignedSqrt

POOLING = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}


def cut(model: keras.Model, layers: str | list[str] = "top", pooling: str = "avg") -> keras.Model:
    """A model from the backbone's input to the globally pooled output(s) of ``layers``.

    Args:
        model: a backbone from :func:`transferkit.models.backbones.create_backbone`.
        layers: ``"top"`` (the last feature map), a layer name, or a list whose pooled outputs
            are concatenated in the order given.
        pooling: ``"avg"`` or ``"max"``.

    Returns:
        A ``keras.Model`` mapping raw images to a ``[batch, features]`` tensor.
    """
    names = [resolve_layer(model, name) for name in ([layers] if isinstance(layers, str) else layers)]
    pooled = [POOLING[pooling](name=f"{name}_{pooling}_pool")(model.get_layer(name).output) for name in names]
    outputs = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="features")(pooled)
    return keras.Model(model.inputs[0], outputs, name=f"{model.name}_features")


#: Test-time augmentation kinds: ``flip`` averages each image and its mirror image, ``crops`` five
#: windows of 87.5% of each side (the centre and the four corners), each resized back.
TTA_KINDS = ("flip", "crops")


def average_over_views(model: keras.Model, kind: str = "flip") -> keras.Model:
    """A model whose output is the mean of ``model`` over test-time views of each image (:data:`TTA_KINDS`).

    Test-time augmentation built into the model, so training features, ``predict`` and exported
    models all see the same thing.
    """
    inputs = keras.Input(model.input_shape[1:], name="image")
    if kind == "flip":
        views = [inputs, HorizontalFlip(name="flip")(inputs)]
    elif kind == "crops":
        views = [CropResize(corner, 0.875, name=f"crop_{corner}")(inputs) for corner in CROP_CORNERS]
    else:
        raise ValueError(f"test-time augmentation must be one of {TTA_KINDS}, got {kind!r}")
    outputs = keras.layers.Average(name=f"{kind}_average")([model(view) for view in views])
    return keras.Model(inputs, outputs, name=f"{model.name}_tta")


def average_over_flips(model: keras.Model) -> keras.Model:
    """``model`` averaged over each image and its mirror image (:func:`average_over_views` with ``flip``)."""
    return average_over_views(model, "flip")


def power_normalize(model: keras.Model) -> keras.Model:
    """``model`` followed by a signed square root of each output value."""
    return keras.Model(model.inputs[0], SignedSqrt(name="power_norm")(model.output), name=f"{model.name}_sqrt")


# --------------------------------------------------------------------------------------------
# Freezing and unfreezing a classifier from `transferkit.models.heads.attach_head`
# --------------------------------------------------------------------------------------------

#: The pooling layer that `transferkit.models.heads.attach_head` puts after the cut: the first head layer.
HEAD_POOL = "head_pool"


def body_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers of a classifier: every layer before its ``head_pool`` layer.

    In a functional model ``model.layers`` runs from the input to the output, and everything the
    head computes depends on the pooled features, so the body is exactly the layers before the
    pooling layer (the input layer included), whatever the head's own layers are called.

    Args:
        model: a classifier from `transferkit.models.heads.attach_head`, or a bare backbone (all body).

    Returns:
        The body's layers, in ``model.layers`` order.
    """
    names = [layer.name for layer in model.layers]
    return model.layers[:names.index(HEAD_POOL)] if HEAD_POOL in names else list(model.layers)


def freeze(layers) -> None:
    """Makes ``layers`` untrainable; frozen BatchNormalization layers also run in inference mode.

    Example:
        >>> freeze(body_layers(model))   # warm-up: only the head trains (recompile afterwards)
    """
    for layer in layers:
        layer.trainable = False


def set_trainable(model: keras.Model, trainable_layer_names) -> None:
    """Makes exactly the named layers of ``model`` trainable and every other layer frozen.

    Args:
        model: any Keras model; compile it again afterwards for the change to take effect.
        trainable_layer_names: names of layers in ``model.layers``.

    Raises:
        BackboneError: a name that is not a layer of ``model``, with a did-you-mean.
    """
    names = set(trainable_layer_names)
    for unknown in sorted(names - {layer.name for layer in model.layers}):
        resolve_layer(model, unknown)  # raises with the closest name
    model.trainable = True  # a frozen model hides the trainable weights of all its layers
    for layer in model.layers:
        layer.trainable = layer.name in names


def unfreeze(model: keras.Model, *, from_layer: str | None = None, top_blocks: int | None = None,
             fraction: float | None = None, everything: bool = False, train_batchnorm: bool = False,
             batchnorm_momentum: float | None = None, info: BackboneInfo | None = None) -> list[str]:
    """Sets which layers fine-tuning trains: the head, and the top of the body.

    At most one of the first four arguments picks the first body layer that trains; it and every
    later body layer train:

    - ``from_layer``: the named layer. None (and no other choice given) means ``info.finetune_from``,
      or the whole body for a model that is not in the registry (a user's own network).
    - ``top_blocks=N``: the last N blocks. Blocks end at the backbone's cut points, so the N-th
      block from the top starts right after the N-th last cut point below the body's last layer.
      The final feature map's stage counts as a block (``top_blocks=1`` of MobileNetV2 trains
      ``Conv_1``); as many blocks as the body has (MobileNetV2: 17) include the stem: all of it.
    - ``fraction=f``: the last ``ceil(f * n)`` of the body's n layers with weights (BatchNorm
      included), and the layers without weights between them.
    - ``everything=True``: the whole body.

    Head layers always train. Body BatchNormalization layers stay frozen, which in Keras 3 also
    keeps them in inference mode (moving statistics untouched), unless ``train_batchnorm``; then
    ``batchnorm_momentum``, if given, replaces their momentum (a short run from random or distant
    statistics needs a faster one than Keras' backbones' 0.99-0.999).

    Args:
        model: a classifier from `transferkit.models.heads.attach_head` (or a bare backbone).
        info: the backbone's registry entry; None looks it up from the model's layers. Needed
            for ``top_blocks`` and for the default ``from_layer``.

    Returns:
        The names of the body layers with weights that now train, in ``model.layers`` order.

    Raises:
        RecipeError: more than one choice, more top blocks than the body has, a fraction out of
            range, a head layer. Its key is the argument (``from`` for ``from_layer``, the word a
            recipe uses: ``from`` is a Python keyword).
        BackboneError: an unknown layer name (with a did-you-mean).
    """
    choices = {"from_layer": from_layer, "top_blocks": top_blocks, "fraction": fraction,
               "everything": everything or None}
    chosen = [name for name, value in choices.items() if value is not None]
    if len(chosen) > 1:
        raise RecipeError(f"give one of {', '.join(choices)}; got {', '.join(chosen)}")
    mode = chosen[0] if chosen else "from_layer"
    body = body_layers(model)
    start = _first_trained(model, body, mode, choices[mode], info)
    trained = [layer for layer in body[start:]
               if train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization)]
    for layer in trained:
        if batchnorm_momentum is not None and isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(batchnorm_momentum)
    set_trainable(model, {layer.name for layer in trained + model.layers[len(body):]})
    return [layer.name for layer in trained if layer.weights]


def count_parameters(model: keras.Model) -> dict[str, int]:
    """Parameter counts for a per-phase printout.

    Returns:
        ``{"trainable": ..., "non_trainable": ..., "total": ...}`` (BatchNorm moving statistics
        and frozen layers count as non-trainable).
    """
    def size(weights):
        return int(sum(math.prod(weight.shape) for weight in weights))

    trainable, non_trainable = size(model.trainable_weights), size(model.non_trainable_weights)
    return {"trainable": trainable, "non_trainable": non_trainable, "total": trainable + non_trainable}


def _first_trained(model, body, mode: str, value, info) -> int:
    """Index into ``body`` of the first layer that the chosen ``mode`` of `unfreeze` trains."""
    names = [layer.name for layer in body]
    if mode == "everything":
        return 0
    if mode == "fraction":
        if not 0 < value <= 1:  # 0 would index [-0], the whole body
            raise RecipeError(f"expected a number > 0 and <= 1, got {value!r}", key="fraction")
        with_weights = [i for i, layer in enumerate(body) if layer.weights]
        return with_weights[-math.ceil(value * len(with_weights))]
    if mode == "from_layer" and value is not None:
        name = resolve_layer(model, value)
        if name not in names:
            raise RecipeError(f"{name!r} is a head layer: give a layer of the backbone", key="from")
        return names.index(name)
    info = info or backbone_of(model)
    if info is None and mode == "from_layer":
        return 0  # a model of the user's own: no registry default, so all of it trains
    if info is None:
        raise BackboneError(f"cannot tell which backbone model {model.name!r} was built from: pass "
                            "info=get_backbone_info(name), or give finetune.unfreeze.from a layer name")
    if mode == "top_blocks":
        return _top_blocks_start(names, info, value)
    if info.finetune_from not in names:
        raise RecipeError(f"{info.name}'s default {info.finetune_from} is not in the body cut at {names[-1]}: "
                          "give from, top_blocks or fraction", key="from")
    return names.index(info.finetune_from)


def count_blocks(names, info: BackboneInfo) -> int:
    """How many blocks ``top_blocks`` can unfreeze in a body with these layer names (input to output)."""
    return len(_block_ends(names, info)) + 1


def check_top_blocks(top_blocks: int, names, info: BackboneInfo) -> None:
    """Raises a one-line RecipeError (key ``top_blocks``) unless a body with these layer names has
    ``top_blocks`` blocks."""
    available = count_blocks(names, info)
    if not 1 <= top_blocks <= available:
        raise RecipeError(f"{top_blocks} is out of range: this {info.name} body has {available} blocks; "
                          f"give 1 to {available}, or all: true", key="top_blocks")


def _block_ends(names, info: BackboneInfo) -> list[int]:
    """Indexes of the block ends: the cut points before the body's last layer."""
    return [i for i, name in enumerate(names[:-1]) if name in info.cut_points]


def _top_blocks_start(names: list[str], info: BackboneInfo, blocks: int) -> int:
    """Where the last ``blocks`` blocks start: after a cut point, or at 0 for the whole body."""
    check_top_blocks(blocks, names, info)
    ends = _block_ends(names, info)
    return ends[-blocks] + 1 if blocks <= len(ends) else 0
