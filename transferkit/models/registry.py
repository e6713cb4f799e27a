"""The backbone table: every supported keras.applications network, its sizes and cut points.

One table, `BACKBONES`, describes every supported network (timm-registry style); `get_backbone_info`
looks one up by name. Pure data: nothing here imports Keras, so listing backbones is instant.
`transferkit.models.weights` finds their ImageNet files and `transferkit.models.backbones` builds them.

Example:
    >>> info = get_backbone_info("mobilenet_v2")
    >>> info.mid_cut, info.finetune_from
    ('block_12_add', 'block_13_expand')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transferkit.errors import BackboneError, did_you_mean


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
XCEPTION_ADDS = tuple(f"block{i}_add" for i in range(2, 14))  # named by create_backbone
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
        ("block1_conv2_act", *XCEPTION_ADDS, "block14_sepconv2_act"),
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

