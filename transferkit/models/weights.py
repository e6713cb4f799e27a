"""ImageNet weights, offline-aware: Keras' cache folder, its file names, and where a build gets its weights.

Nothing here imports Keras: `check_weights` reports a missing ImageNet file (with the file to put
where) or a bad alpha or size within seconds, before TensorFlow starts. `weights_plan` is what
`transferkit.models.backbones.create_backbone` follows: load a cached file itself, or let Keras load
(or download) ImageNet weights.

Example:
    >>> weights_filename("mobilenet_v2", image_size=160)
    'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5'
    >>> check_weights("mobilenet_v2", image_size=160)  # reuses the 224 px file offline
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path

from transferkit.errors import BackboneError
from transferkit.models.registry import BACKBONES, get_backbone_info

# MobileNet and MobileNetV2 have one ImageNet file per input size; other sizes load the 224 one.
_SIZED_WEIGHTS = {"mobilenet": (128, 160, 192, 224), "mobilenet_v2": (96, 128, 160, 192, 224)}
_MOBILENET_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}
# EfficientNet B0-B3 add a normalisation fix-up layer only when built with weights="imagenet"
# (tensorflow/tensorflow#49930), so Keras itself must load their ImageNet weights.
_KERAS_LOADS_IMAGENET = {"efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"}
_WEIGHTS_HOST = ("storage.googleapis.com", 443)


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


def check_weights(name: str, weights: str | os.PathLike | None = "imagenet", image_size: int | None = None,
                  alpha: float | None = None, include_top: bool = False, **kwargs) -> None:
    """Checks, without importing Keras, that `create_backbone` with these arguments can get its weights.

    Call it before slow work (data screening, starting TensorFlow) so a missing weights file or a
    bad alpha or size fails within seconds. Arguments are those of `create_backbone`.

    Raises:
        BackboneError: the same one-line error `create_backbone` would raise.
    """
    info = get_backbone_info(name)
    weights_plan(info, weights, int(image_size or info.default_size), alpha, include_top, kwargs)


def weights_plan(info, weights, size, alpha, include_top, kwargs):
    """Validated alpha, plus how the weights get in: (alpha, file we load, `weights` for Keras).

    Raises:
        BackboneError: bad alpha or size, or weights that cannot be found (see `check_weights`).
    """
    alpha = _check_alpha(info, alpha, weights)
    _check_size(info, size, include_top and weights == "imagenet")
    minimalistic = bool(kwargs.get("minimalistic", False))
    if minimalistic and weights == "imagenet" and alpha not in (None, 1.0):
        raise BackboneError(f"{info.name} with minimalistic: true has ImageNet weights for alpha 1.0 only, "
                            f"not {alpha}: drop alpha, or use weights: null")
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
            raise BackboneError(not_cached_message(info, alpha, size, include_top, minimalistic))
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


def not_cached_message(info, alpha, size, include_top, minimalistic):
    """The one-line error for ImageNet weights neither cached nor downloadable: which file to put where."""
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
