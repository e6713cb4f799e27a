"""The backbone registry: keras.applications models, their cut points, and offline-aware weights.

One table, `BACKBONES`, describes every supported network (timm-registry style). `create_backbone`
builds one as a flat functional Keras model that takes raw RGB pixels (0..255): its first layer
after the input is a `transferkit.models.layers.Preprocess` layer named "preprocess", then come the
keras.applications layers under their usual names (`model.get_layer("block_13_expand")` works).

Nothing here imports Keras at module level: listing backbones and checking for weight files is
instant, and a missing ImageNet file is reported before the few seconds TensorFlow takes to load.

Example:
    >>> info = get_backbone_info("mobilenet_v2")
    >>> info.mid_cut, weights_filename("mobilenet_v2", image_size=160)
    ('block_12_add', 'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5')
    >>> model = create_backbone("mobilenet_v2", image_size=160)  # reuses the 224 px file offline
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.errors import BackboneError, did_you_mean

if TYPE_CHECKING:
    import keras

logger = logging.getLogger("transferkit")


@dataclass(frozen=True)
class BackboneInfo:
    """What transferkit knows about one keras.applications network.

    Attributes:
        name: registry key, e.g. "mobilenet_v2".
        constructor: the `keras.applications` attribute, e.g. "MobileNetV2".
        default_size: the input size the ImageNet weights were trained at.
        min_size: the smallest input size Keras accepts.
        preprocessing: how raw 0..255 RGB becomes model input: "tf" (x / 127.5 - 1), "torch"
            (x / 255, ImageNet mean / std), "caffe" (BGR minus the mean pixel), or None when the
            Keras model normalises inside itself (EfficientNet, EfficientNetV2, ConvNeXt,
            MobileNetV3).
        cut_points: named block ends, shallow to deep, usable as feature layers; the last is the
            final feature map before pooling.
        mid_cut: a good intermediate cut for data unlike ImageNet, about 2/3 deep: the end of
            the stride-16 stage.
        finetune_from: the first layer of the top blocks to unfreeze (this layer and all after
            it in `model.layers`): the start of the stride-32 stage.
        alphas: width multipliers with ImageNet weights; () when the family has none.
        stochastic_depth: the `create_backbone` keyword for drop-connect / drop-path, if any.
        description: parameters and ImageNet top-1 as Keras documents them.
        weights_file: Keras' ImageNet file without top at the default alpha and size (see
            `weights_filename` for other settings).
    """

    name: str
    constructor: str
    default_size: int
    min_size: int
    preprocessing: str | None
    cut_points: tuple[str, ...]
    mid_cut: str
    finetune_from: str
    alphas: tuple[float, ...] = ()
    stochastic_depth: str | None = None
    description: str = ""
    weights_file: str = ""


# --- cut-point generators: block names follow the Keras source of each family ---------------------

def _inverted_residual_ends(prefix, blocks, residual, project):
    """MobileNetV2/V3 block outputs: the residual add where a block has one, else its projection BN."""
    return tuple(f"{prefix}{i}_{'add' if i in residual else project}" for i in blocks)


def _efficientnet_stage_ends(repeats, depth_coefficient=1.0):
    """EfficientNet(V2) stage outputs: the last block's add (block ids run a, b, c, ...)."""
    ends = []
    for stage, base_repeats in enumerate(repeats, start=1):
        n = math.ceil(depth_coefficient * base_repeats)  # Keras' round_repeats
        ends.append(f"block{stage}{chr(ord('a') + n - 1)}_" + ("add" if n > 1 else "project_bn"))
    return (*ends, "top_activation")


def _resnet_block_outs(blocks_per_stage):
    return tuple(f"conv{stage}_block{b}_out"
                 for stage, n in enumerate(blocks_per_stage, start=2) for b in range(1, n + 1))


def _efficientnet(variant, size, depth_coefficient, description):
    ends = _efficientnet_stage_ends((1, 2, 2, 3, 3, 4, 1), depth_coefficient)
    return BackboneInfo(
        f"efficientnet_{variant}", f"EfficientNet{variant.upper()}", size, 32, None, ends,
        mid_cut=ends[4], finetune_from="block6a_expand_conv", stochastic_depth="drop_connect_rate",
        description=description, weights_file=f"efficientnet{variant}_notop.h5")


def _classic_file(stem):
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


_MOBILENET_V2_ENDS = _inverted_residual_ends(
    "block_", range(1, 17), {2, 4, 5, 7, 8, 9, 11, 12, 14, 15}, "project_BN")
_MOBILENET_V3_SMALL_ENDS = _inverted_residual_ends(
    "expanded_conv_", range(1, 11), {2, 4, 5, 7, 9, 10}, "project_bn")
_MOBILENET_V3_LARGE_ENDS = _inverted_residual_ends(
    "expanded_conv_", range(1, 15), {2, 4, 5, 7, 8, 9, 11, 13, 14}, "project_bn")
_XCEPTION_ADDS = tuple(f"block{i}_add" for i in range(2, 14))  # named by create_backbone
_VGG16_CUTS = ("block1_pool", "block2_pool", "block3_conv3", "block3_pool",
               "block4_conv3", "block4_pool", "block5_conv3", "block5_pool")
_DENSENET121_CUTS = ("conv1_relu", "pool2_relu", "pool3_relu", "conv4_block12_concat",
                     "pool4_relu", "conv5_block8_concat", "relu")
_CONVNEXT_TINY_CUTS = ("convnext_tiny_stem", "convnext_tiny_downsampling_block_0",
                       "convnext_tiny_downsampling_block_1", "convnext_tiny_downsampling_block_2",
                       "convnext_tiny_head_layernorm")  # stage ends are unnamed ops; see below

BACKBONES: dict[str, BackboneInfo] = {info.name: info for info in [
    BackboneInfo(
        "mobilenet", "MobileNet", 224, 32, "tf",
        tuple(f"conv_pw_{i}_relu" for i in range(1, 14)),
        mid_cut="conv_pw_11_relu", finetune_from="conv_dw_12", alphas=(0.25, 0.5, 0.75, 1.0),
        description="4.3M params, 70.4% top-1", weights_file="mobilenet_1_0_224_tf_no_top.h5"),
    BackboneInfo(
        "mobilenet_v2", "MobileNetV2", 224, 32, "tf", (*_MOBILENET_V2_ENDS, "out_relu"),
        mid_cut="block_12_add", finetune_from="block_13_expand",
        alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4), description="3.5M params, 71.3% top-1",
        weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    BackboneInfo(
        "mobilenet_v3_small", "MobileNetV3Small", 224, 32, None,
        (*_MOBILENET_V3_SMALL_ENDS, "conv_1_activation"),
        mid_cut="expanded_conv_7_add", finetune_from="expanded_conv_8_expand", alphas=(0.75, 1.0),
        description="2.9M params, 68.1% top-1",
        weights_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    BackboneInfo(
        "mobilenet_v3_large", "MobileNetV3Large", 224, 32, None,
        (*_MOBILENET_V3_LARGE_ENDS, "conv_1_activation"),
        mid_cut="expanded_conv_11_add", finetune_from="expanded_conv_12_expand", alphas=(0.75, 1.0),
        description="5.4M params, 75.6% top-1",
        weights_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    _efficientnet("b0", 224, 1.0, "5.3M params, 77.1% top-1"),
    _efficientnet("b1", 240, 1.1, "7.9M params, 79.1% top-1"),
    _efficientnet("b2", 260, 1.2, "9.2M params, 80.1% top-1"),
    _efficientnet("b3", 300, 1.4, "12.3M params, 81.6% top-1"),
    BackboneInfo(
        "efficientnet_v2_b0", "EfficientNetV2B0", 224, 32, None,
        _efficientnet_stage_ends((1, 2, 2, 3, 5, 8)),
        mid_cut="block5e_add", finetune_from="block6a_expand_conv",
        stochastic_depth="drop_connect_rate", description="7.2M params, 78.7% top-1",
        weights_file="efficientnetv2-b0_notop.h5"),
    BackboneInfo(
        "resnet50", "ResNet50", 224, 32, "caffe", ("conv1_relu", *_resnet_block_outs((3, 4, 6, 3))),
        mid_cut="conv4_block6_out", finetune_from="conv5_block1_1_conv",
        description="25.6M params, 74.9% top-1", weights_file=_classic_file("resnet50")),
    BackboneInfo(
        "resnet50_v2", "ResNet50V2", 224, 32, "tf", (*_resnet_block_outs((3, 4, 6, 3)), "post_relu"),
        mid_cut="conv4_block6_out", finetune_from="conv5_block1_preact_bn",
        description="25.6M params, 76.0% top-1", weights_file=_classic_file("resnet50v2")),
    BackboneInfo(
        "densenet121", "DenseNet121", 224, 32, "torch", _DENSENET121_CUTS,
        mid_cut="pool4_relu", finetune_from="conv5_block1_0_bn",
        description="8.1M params, 75.0% top-1", weights_file=_classic_file("densenet121")),
    BackboneInfo(
        "inception_v3", "InceptionV3", 299, 75, "tf", tuple(f"mixed{i}" for i in range(11)),
        # mixed8 has no weights: unfreezing from it trains mixed9-10, as in Keras' fine-tuning guide.
        mid_cut="mixed7", finetune_from="mixed8",
        description="23.9M params, 77.9% top-1", weights_file=_classic_file("inception_v3")),
    BackboneInfo(
        "xception", "Xception", 299, 71, "tf",
        ("block1_conv2_act", *_XCEPTION_ADDS, "block14_sepconv2_act"),
        mid_cut="block12_add", finetune_from="block13_sepconv1_act",
        description="22.9M params, 79.0% top-1", weights_file=_classic_file("xception")),
    BackboneInfo(
        "vgg16", "VGG16", 224, 32, "caffe", _VGG16_CUTS,
        mid_cut="block4_pool", finetune_from="block5_conv1",
        description="138.4M params, 71.3% top-1", weights_file=_classic_file("vgg16")),
    # Keras' ConvNeXtTiny fixes drop_path_rate at 0 and ends its stages in unnamed `x + y` ops, so
    # the cut points are the stem, the downsampling blocks (LayerNorm + conv of each stage end) and
    # the final LayerNormalization (which Keras applies after pooling, when there is pooling).
    BackboneInfo(
        "convnext_tiny", "ConvNeXtTiny", 224, 32, None, _CONVNEXT_TINY_CUTS,
        mid_cut="convnext_tiny_downsampling_block_2",
        finetune_from="convnext_tiny_downsampling_block_2",
        description="28.6M params, 81.3% top-1", weights_file="convnext_tiny_notop.h5"),
]}

# MobileNet and MobileNetV2 have one ImageNet file per input size; other sizes load the 224 one.
_SIZED_WEIGHTS = {"mobilenet": (128, 160, 192, 224), "mobilenet_v2": (96, 128, 160, 192, 224)}
_MOBILENET_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}
# EfficientNet B0-B3 add a normalisation fix-up layer only when built with weights="imagenet"
# (tensorflow/tensorflow#49930), so Keras itself must load their ImageNet weights.
_KERAS_LOADS_IMAGENET = {"efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"}
_KERAS_DROP_CONNECT_RATE = 0.2  # EfficientNet(V2)'s built-in rate; the B0.. constructors hide it
_WEIGHTS_HOST = ("storage.googleapis.com", 443)


def list_backbones() -> list[BackboneInfo]:
    """All registered backbones, in registry order (small and fast first)."""
    return list(BACKBONES.values())


def get_backbone_info(name: str) -> BackboneInfo:
    """Looks up a backbone by registry key, case-insensitively, with '-' and '_' alike.

    Args:
        name: e.g. "mobilenet_v2", "MobileNet-V2".

    Returns:
        The `BackboneInfo`.

    Raises:
        BackboneError: unknown name; the message suggests the closest one.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key in BACKBONES:
        return BACKBONES[key]
    hint = did_you_mean(key, BACKBONES, otherwise=f"choose one of {', '.join(BACKBONES)}")
    raise BackboneError(f"unknown backbone {name!r}: {hint} (see `transferkit backbones`)")


def keras_home() -> Path:
    """Keras' cache folder: $KERAS_HOME, else ~/.keras (or /tmp/.keras where ~ is read-only)."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"])
    base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
    return base / ".keras"


def weights_filename(name: str, alpha: float | None = None, image_size: int | None = None,
                     include_top: bool = False, minimalistic: bool = False) -> str:
    """The file Keras looks for in `$KERAS_HOME/models/` for `weights="imagenet"`.

    Mirrors the naming in keras/src/applications/*.py without importing Keras.

    Args:
        name: registry key.
        alpha: width multiplier (families with `alphas` only); None means 1.0.
        image_size: input size; only MobileNet and MobileNetV2 have per-size files.
        include_top: the file with the 1000-class ImageNet classifier.
        minimalistic: MobileNetV3's minimalistic variant.

    Returns:
        A file name such as "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5".
    """
    info = get_backbone_info(name)
    alpha = _check_alpha(info, alpha, "imagenet")
    if info.name in _SIZED_WEIGHTS:
        rows = image_size if image_size in _SIZED_WEIGHTS[info.name] else 224
        no_top = "" if include_top else "_no_top"
        if info.name == "mobilenet":
            return f"mobilenet_{_MOBILENET_ALPHA_TEXT[alpha]}_{rows}_tf{no_top}.h5"
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}{no_top}.h5"
    if info.constructor.startswith("MobileNetV3"):
        variant = info.name.split("_")[-1] + ("_minimalistic" if minimalistic else "")
        return f"weights_mobilenet_v3_{variant}_224_{alpha}_float{'' if include_top else '_no_top_v2'}.h5"
    return info.weights_file.replace("_notop.h5", ".h5") if include_top else info.weights_file


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
    alpha, weights_file, keras_weights = _plan(info, weights, size, alpha, include_top, kwargs)
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
            raise BackboneError(_not_cached_message(info, alpha, size, include_top, minimalistic)) from error
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


# --- helpers -----------------------------------------------------------------------------------

def check_weights(name: str, weights: str | os.PathLike | None = "imagenet", image_size: int | None = None,
                  alpha: float | None = None, include_top: bool = False, **kwargs) -> None:
    """Checks, without importing Keras, that `create_backbone` with these arguments can get its weights.

    Call it before slow work (data screening, starting TensorFlow) so a missing weights file or a
    bad alpha or size fails within seconds. Arguments are those of `create_backbone`.

    Raises:
        BackboneError: the same one-line error `create_backbone` would raise.
    """
    info = get_backbone_info(name)
    _plan(info, weights, int(image_size or info.default_size), alpha, include_top, kwargs)


def _plan(info, weights, size, alpha, include_top, kwargs):
    """Validated alpha, plus how the weights get in: (alpha, file we load, `weights` for Keras)."""
    alpha = _check_alpha(info, alpha, weights)
    _check_size(info, size, include_top and weights == "imagenet")
    minimalistic = bool(kwargs.get("minimalistic", False))
    return (alpha, *_plan_weights(info, weights, alpha, size, include_top, minimalistic))


def _check_alpha(info, alpha, weights):
    """Validates alpha and returns it as a float (None stays None, meaning 1.0 for ImageNet files)."""
    if alpha is None:
        return 1.0 if weights == "imagenet" and info.alphas else None
    if not info.alphas:
        families = ", ".join(i.name for i in BACKBONES.values() if i.alphas)
        raise BackboneError(f"{info.name} has no width multiplier: drop alpha (only {families} take one)")
    alpha = float(alpha)
    if alpha <= 0:
        raise BackboneError(f"alpha must be positive, got {alpha}")
    if weights == "imagenet" and alpha not in info.alphas:
        raise BackboneError(f"{info.name} has ImageNet weights for alpha "
                            f"{', '.join(map(str, info.alphas))} only, not {alpha}: "
                            "pick one or use weights: null")
    return alpha


def _check_size(info, size, imagenet_top):
    if size < info.min_size:
        raise BackboneError(f"image_size {size} is too small for {info.name}: Keras needs at least "
                            f"{info.min_size} px")
    if imagenet_top and not info.constructor.startswith("MobileNetV3"):
        sizes = _SIZED_WEIGHTS.get(info.name, (info.default_size,))
        if size not in sizes:
            raise BackboneError(f"include_top with ImageNet weights needs image_size "
                                f"{' or '.join(map(str, sizes))} for {info.name}, not {size}")


def _plan_weights(info, weights, alpha, size, include_top, minimalistic):
    """Decides, before Keras is imported, how weights get in: (file we load, `weights` for Keras)."""
    if weights is None:
        return None, None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {path} not found: give an existing .h5 or .weights.h5 "
                                "file, or use weights: imagenet or null")
        return path, None
    cached = _cached_imagenet_file(info, alpha, size, include_top, minimalistic)
    if cached is None:
        if not _download_possible():
            raise BackboneError(_not_cached_message(info, alpha, size, include_top, minimalistic))
        return None, "imagenet"  # Keras downloads it
    if info.name in _KERAS_LOADS_IMAGENET:
        return None, "imagenet"  # Keras finds it in its cache
    return cached, None


def _cached_imagenet_file(info, alpha, size, include_top, minimalistic):
    """The ImageNet file in $KERAS_HOME/models/, or MobileNet(V2)'s 224 px file at other sizes."""
    models = keras_home() / "models"
    exact = models / weights_filename(info.name, alpha, size, include_top, minimalistic)
    if exact.is_file():
        return exact
    if info.name in _SIZED_WEIGHTS:
        at_224 = models / weights_filename(info.name, alpha, 224, include_top)
        if at_224.is_file():
            return at_224
    return None


def _not_cached_message(info, alpha, size, include_top, minimalistic):
    file = weights_filename(info.name, alpha, size, include_top, minimalistic)
    if info.name in _SIZED_WEIGHTS and size != 224:
        file += f" (or {weights_filename(info.name, alpha, 224, include_top)}, reused at any size)"
    setting = f"alpha {alpha}, {size} px" if alpha is not None else f"{size} px"
    return (f"ImageNet weights for {info.name} ({setting}) are not cached and cannot be downloaded: "
            f"put {file} into {keras_home() / 'models'}/ (set KERAS_HOME), or use weights: null")


def _download_possible(timeout: float = 2.0) -> bool:
    """Whether Keras' weight host answers within `timeout` s (DNS included); True behind a proxy."""
    if urllib.request.getproxies().get("https"):
        return True
    reachable = []

    def connect():
        try:
            socket.create_connection(_WEIGHTS_HOST, timeout=timeout).close()
            reachable.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(reachable)


def _name_unnamed_cut_points(model, info):
    """Gives stable names to the cut-point layers Keras leaves auto-named ("add_17")."""
    import keras

    names = [layer.name for layer in model.layers]
    if info.name == "xception":  # residual adds of blocks 2..13, in graph order
        adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
        for layer, new_name in zip(adds, _XCEPTION_ADDS):
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
