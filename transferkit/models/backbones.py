"""Building backbones: keras.applications models that take raw pixels, their layers and cut points.

`create_backbone` builds a network from the `BACKBONES` table (`transferkit.models.registry`) as a
flat functional Keras model that takes raw RGB pixels (0..255): its first layer after the input is
a `transferkit.models.layers.Preprocess` layer named "preprocess", then come the keras.applications
layers under their usual names (`model.get_layer("block_13_expand")` works). Its ImageNet weights
are found offline by `transferkit.models.weights`.

Nothing here imports Keras at module level: checking a layer name against the registry is instant,
and a missing ImageNet file is reported before the few seconds TensorFlow takes to load.

Example:
    >>> model = create_backbone("mobilenet_v2", image_size=160)  # reuses the 224 px file offline
    >>> resolve_layer(model, "top")
    'out_relu'
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
from typing import TYPE_CHECKING

from transferkit.errors import BackboneError, did_you_mean
from transferkit.models.registry import BACKBONES, XCEPTION_ADDS, get_backbone_info
from transferkit.models.weights import not_cached_message, weights_filename, weights_plan

if TYPE_CHECKING:
    import keras

logger = logging.getLogger("transferkit")

_KERAS_DROP_CONNECT_RATE = 0.2  # EfficientNet(V2)'s built-in rate; the B0.. constructors hide it


def create_backbone(name: str, weights: str | os.PathLike | None = "imagenet",
                    image_size: int | None = None, alpha: float | None = None,
                    include_top: bool = False, **kwargs) -> keras.Model:
    """Builds a backbone that takes raw RGB pixels, with ImageNet weights found offline if cached.

    The model is flat: `image` input (float 0..255, `(image_size, image_size, 3)`), then a
    `Preprocess` layer named "preprocess" (identity for backbones that normalise inside the Keras
    model, so every backbone looks the same), then the keras.applications layers under their usual
    names. Layers Keras leaves auto-named but the registry uses as cut points get stable names
    (Xception's `blockN_add`, MobileNetV3's `conv_1_activation`, ConvNeXt's `..._head_layernorm`).

    ImageNet weights come from `$KERAS_HOME/models/` when the file is there. MobileNet(V2) at a
    size without a cached file of its own reuses the cached 224 px file (convolution weights fit
    any size). EfficientNet B0-B3 are the exception: Keras adds a normalisation fix-up layer only
    when it loads their ImageNet weights itself, so it does, from its own cache. Otherwise Keras
    downloads the file, and when the network is unreachable a one-line `BackboneError` says which
    file to put where, before Keras is even imported.

    Args:
        name: registry key, e.g. "mobilenet_v2" (see `list_backbones`).
        weights: "imagenet", None (random init), or a path to a Keras weights file (.h5 or
            .weights.h5) saved from a model built the same way.
        image_size: input height and width; defaults to the backbone's `default_size`.
        alpha: width multiplier, for families with `alphas`; None is Keras' default (1.0).
        include_top: keep the 1000-class ImageNet classifier.
        **kwargs: passed to the Keras constructor (e.g. `pooling`, `minimalistic`), plus the
            backbone's `stochastic_depth` keyword (e.g. `drop_connect_rate` for EfficientNet).
            `include_preprocessing=False` removes the model's own normalisation: the input is
            then no longer raw pixels.

    Returns:
        A functional `keras.Model` named after the registry key.

    Raises:
        BackboneError: unknown name, bad alpha or size, or weights that cannot be found.
    """
    info = get_backbone_info(name)
    size = int(image_size or info.default_size)
    for reserved in ("input_tensor", "input_shape"):
        if reserved in kwargs:
            raise BackboneError(f"create_backbone sets {reserved} itself: pass image_size instead")
    drop_rate = kwargs.pop(info.stochastic_depth, None) if info.stochastic_depth else None
    minimalistic = bool(kwargs.get("minimalistic", False))
    alpha, weights_file, keras_weights = weights_plan(info, weights, size, alpha, include_top, kwargs)
    if weights == "imagenet" and weights_file and \
            weights_file.name != weights_filename(info.name, alpha, size, include_top, minimalistic):
        logger.info("%s: no %d px ImageNet file cached, reusing the 224 px weights %s",
                    info.name, size, weights_file.name)

    import keras

    from transferkit.models.layers import Preprocess

    if keras.config.image_data_format() != "channels_last":
        raise BackboneError("transferkit builds channels_last models: set image_data_format to "
                            "channels_last in ~/.keras/keras.json")
    constructor = getattr(keras.applications, info.constructor)
    unknown = set(kwargs) - set(inspect.signature(constructor).parameters)
    if unknown:
        raise BackboneError(f"keras.applications.{info.constructor} takes no {', '.join(sorted(unknown))}: "
                            "remove it from the backbone settings")
    if alpha is not None:
        kwargs["alpha"] = alpha
    inputs = keras.Input((size, size, 3), name="image")
    x = Preprocess(info.preprocessing, name="preprocess")(inputs)
    try:
        base = constructor(input_tensor=x, input_shape=(size, size, 3), include_top=include_top,
                           weights=keras_weights, **kwargs)
    except Exception as error:  # Keras' download failures are plain Exceptions
        if keras_weights == "imagenet" and not isinstance(error, (TypeError, ValueError)):
            raise BackboneError(not_cached_message(info, alpha, size, include_top, minimalistic)) from error
        raise
    model = keras.Model(inputs, base.output, name=info.name)
    _name_unnamed_cut_points(model, info)
    if drop_rate is not None:
        _set_drop_connect_rate(model, drop_rate)
    if weights_file is not None:
        try:
            model.load_weights(weights_file)
        except Exception as error:
            raise BackboneError(f"cannot load weights {weights_file} into {info.name} "
                                f"({size} px, include_top={include_top}): {error}") from error
    return model


def layer_names(name: str, alpha: float | None = None, **kwargs) -> tuple[str, ...]:
    """The names of every layer `create_backbone` builds (its ``model.layers``), without weights.

    Layer names do not depend on weights or on the input size, so the architecture is built once
    with ``weights=None`` at the default size and its names are kept for the process (per backbone,
    alpha and keyword arguments). Keras' counters for automatic layer names ("add_3") are restored
    afterwards, so a model built later gets the same names as without this call.

    Args:
        name: registry key.
        alpha: width multiplier, as for `create_backbone`.
        **kwargs: the other `create_backbone` keywords (a recipe's ``backbone.options``).

    Returns:
        The layer names, input to output.

    Raises:
        BackboneError: as `create_backbone` (unknown name, bad alpha or keyword).
    """
    info = get_backbone_info(name)
    key = (info.name, alpha, repr(sorted(kwargs.items())))
    if key not in _LAYER_NAMES:
        from transferkit.logs import start_keras_quietly

        start_keras_quietly()  # a command's first use of Keras: TensorFlow's start-up lines stay off the terminal
        with _layer_name_counters_kept():
            model = create_backbone(info.name, weights=None, alpha=alpha, **kwargs)
        _LAYER_NAMES[key] = tuple(layer.name for layer in model.layers)
    return _LAYER_NAMES[key]


_LAYER_NAMES: dict[tuple, tuple[str, ...]] = {}


@contextlib.contextmanager
def _layer_name_counters_kept():
    """Restores Keras' automatic layer-name counters on exit (Keras keeps them in its global state)."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # another Keras layout: names may shift, nothing else changes
        yield
        return
    saved = copy.deepcopy(global_state.get_global_attribute("object_name_uids"))
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids", saved)


def check_layer(name: str, layer: str, key: str, alpha: float | None = None, **kwargs) -> None:
    """Checks that a layer named in a recipe exists in the backbone, before anything is built for real.

    "top", the cut points and the registry's defaults answer at once; any other name is looked up
    in `layer_names` (the architecture built without weights, once per process).

    Args:
        name: registry key of the backbone.
        layer: the layer name from the recipe.
        key: the recipe key it came from, e.g. "extract.layer", for the message.
        alpha, **kwargs: as for `create_backbone`.

    Raises:
        BackboneError: no such layer: one line with the closest name and the cut points.
    """
    info = get_backbone_info(name)
    if layer == "top" or layer in info.cut_points or layer in (info.mid_cut, info.finetune_from):
        return
    names = layer_names(info.name, alpha, **kwargs)
    if layer in names:
        return
    suggestion = did_you_mean(layer, names)
    hint = f": {suggestion}" if suggestion else ""
    raise BackboneError(f"{key}: {info.name} has no layer {layer!r}{hint} (cut points: top, "
                        f"{', '.join(info.cut_points)}; fine-tuning starts by default at {info.finetune_from})")


def resolve_layer(model: keras.Model, name: str) -> str:
    """Turns a layer name from a recipe into a layer of `model`.

    Args:
        model: a model from `create_backbone` (or one containing its layers).
        name: "top" for the backbone's last cut point, or any layer name in `model`.

    Returns:
        The layer name.

    Raises:
        BackboneError: no such layer; the message suggests the closest name and the cut points.
    """
    info = backbone_of(model)
    names = [layer.name for layer in model.layers]
    if name == "top":
        if info is None or info.cut_points[-1] not in names:
            raise BackboneError(f"model {model.name!r} is not a transferkit backbone, so 'top' is "
                                "undefined: give a layer name instead")
        return info.cut_points[-1]
    if name in names:
        return name
    hint = did_you_mean(name, names)
    message = f"model {model.name!r} has no layer {name!r}" + (f": {hint}" if hint else "")
    if info is not None:
        message += f" (cut points: top, {', '.join(info.cut_points)})"
    raise BackboneError(message)


def _name_unnamed_cut_points(model, info):
    """Gives stable names to the cut-point layers Keras leaves auto-named ("add_17")."""
    import keras

    names = [layer.name for layer in model.layers]
    if info.name == "xception":  # residual adds of blocks 2..13, in graph order
        adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
        for layer, new_name in zip(adds, XCEPTION_ADDS):
            layer.name = new_name
    elif info.constructor.startswith("MobileNetV3"):  # the activation after the last conv
        model.layers[names.index("conv_1_bn") + 1].name = info.cut_points[-1]
    elif info.name == "convnext_tiny" and info.cut_points[-1] not in names:
        model.layers[-1].name = info.cut_points[-1]  # without top: the final LayerNormalization


def _set_drop_connect_rate(model, rate):
    """Scales EfficientNet's per-block drop-connect rates (Keras: 0.2 * block / blocks) to `rate`."""
    import keras

    if not 0.0 <= rate < 1.0:
        raise BackboneError(f"drop_connect_rate must be in [0, 1), got {rate}")
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout) and layer.name.endswith("_drop"):
            layer.rate = layer.rate * rate / _KERAS_DROP_CONNECT_RATE


def backbone_of(model):
    """The registry entry a model was built from: by name, else by which cut points it has."""
    if model.name in BACKBONES:
        return BACKBONES[model.name]
    names = {layer.name for layer in model.layers}
    # The last match is the deepest variant (an EfficientNet-B3 also has B0's stage-end names).
    matches = [info for info in BACKBONES.values() if set(info.cut_points) <= names]
    return matches[-1] if matches else None
