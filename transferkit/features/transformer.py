"""`FeatureExtractor`: a pretrained backbone as a scikit-learn transformer, images in, features out.

It plugs into `Pipeline` and `GridSearchCV` like any transformer. Its `fit` learns nothing from the
data: it builds the Keras feature model (`create_backbone` + `cut`). Built models are kept in a
small module-level LRU cache keyed on (backbone, weights, image_size, alpha) and, on top, on
(layer, pooling), so the clones that `GridSearchCV` fits for each fold and each grid point reuse one
backbone instead of rebuilding it. `clear_model_cache()` frees them. Random-init extractors
(`weights=None`) are never cached: each `fit` draws its own weights.

The extract strategy embeds through it too: `feature_model()` is the Keras model it saves in a run
folder, and `predict_in_batches` the forward pass that both use.

Fitted extractors pickle (`joblib.dump` of a fitted pipeline works): the Keras model is left out and
rebuilt on first use after loading; with `weights=None` its random weights are pickled along.

Example:
    >>> pipe = make_pipeline(FeatureExtractor("mobilenet_v2", layer="top"), LogisticRegression())
    >>> search = GridSearchCV(pipe, {"featureextractor__layer": ["block_12_add", "top"],
    ...                              "logisticregression__C": [0.1, 1.0]}, cv=3)
    >>> search.fit(image_paths, labels).predict(["new.jpg"])
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from transferkit.models.registry import get_backbone_info
from transferkit.models.weights import check_weights
from transferkit.logs import log_to_stderr_unless_configured

log = logging.getLogger("transferkit")

_CHUNK = 256  # images decoded and embedded at a time: bounds memory for long path lists


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Globally pooled features of a pretrained keras.applications backbone.

    Args:
        backbone: registry key, e.g. "mobilenet_v2" (see `transferkit backbones`).
        layer: "top", a layer name, or a list of them (pooled outputs concatenated in that order).
        weights: "imagenet", None (random init) or a Keras weights file.
        image_size: square input side; None: the backbone's default size.
        alpha: width multiplier (MobileNet families); None: 1.0.
        pooling: "avg" or "max".
        batch_size: images per forward pass.
        tta: average the features of each image and its horizontal flip
            (`transferkit.models.surgery.average_over_flips`).
        power_norm: a signed square root of each feature (`transferkit.models.surgery.power_normalize`).
        options: extra backbone constructor arguments, e.g. `{"drop_connect_rate": 0.2}`.
        verbose: log a line per 256 images transformed (to stderr, unless logging is configured).

    Attributes:
        model_: the Keras model, raw RGB 0..255 images -> pooled features, before `tta` and
            `power_norm` (shared with other extractors of the same settings through the cache: use
            it, don't train it); `feature_model()` adds those.
        layers_: `{resolved layer name: feature count}`, in output order.
        n_features_out_: features per image.
        image_size_: the input side images are resized to.

    Example:
        >>> extractor = FeatureExtractor("mobilenet", alpha=0.25, image_size=128).fit(paths)
        >>> extractor.transform(["cat.jpg", "dog.png"]).shape
        (2, 256)
    """

    def __init__(self, backbone="mobilenet_v2", layer="top", weights="imagenet", image_size=None,
                 alpha=None, pooling="avg", batch_size=32, tta=False, power_norm=False, options=None,
                 verbose=False):
        self.backbone = backbone
        self.layer = layer
        self.weights = weights
        self.image_size = image_size
        self.alpha = alpha
        self.pooling = pooling
        self.batch_size = batch_size
        self.tta = tta
        self.power_norm = power_norm
        self.options = options
        self.verbose = verbose

    def fit(self, X, y=None):
        """Validates the parameters and builds the feature model; `X` and `y` are not used.

        Returns:
            self.

        Raises:
            BackboneError: unknown backbone or layer, bad alpha or size, missing weights.
            ValueError: bad `layer` type, `pooling`, `batch_size` or `options`.
        """
        self.image_size_ = self._check_params()
        self.model_, layers = self._build_model()
        self.layers_ = dict(layers)
        self.n_features_out_ = sum(self.layers_.values())
        return self

    def transform(self, X):
        """Features of images.

        Args:
            X: image files (a list or 1-D array of str / Path), or pixels `[N, H, W, 3]`, uint8 or
                float in 0..255, resized to `image_size_` with Pillow's bilinear filter (as files are).

        Returns:
            float32 array `[N, n_features_out_]`.
        """
        check_is_fitted(self)
        images = _as_images(X)
        if self.verbose:
            log_to_stderr_unless_configured()
        chunks = []
        model = self.feature_model()
        for start in range(0, len(images), _CHUNK):
            pixels = pixels_of(images[start:start + _CHUNK], self.image_size_)
            chunks.append(predict_in_batches(model, pixels, self.batch_size).astype(np.float32))
            if self.verbose:
                log.info("features: %d/%d images", min(start + _CHUNK, len(images)), len(images))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.n_features_out_), np.float32)

    def feature_model(self):
        """The Keras model `transform` runs: raw RGB 0..255 pixels `[N, S, S, 3]` -> float
        `[N, n_features_out_]`, `model_` with flip averaging and power normalisation as set."""
        check_is_fitted(self)
        return _finished(self._model(), bool(self.tta), bool(self.power_norm))

    def get_feature_names_out(self, input_features=None):
        """Names `"<layer>_<pooling><i>"`, e.g. `"conv_pw_13_relu_avg0"`; `input_features` is ignored
        (images have no feature names)."""
        check_is_fitted(self)
        return np.asarray([f"{name}_{self.pooling}{i}" for name, width in self.layers_.items()
                           for i in range(width)], dtype=object)

    # --- pickling: the Keras model stays out, and comes back on first use ---------------------------

    def __getstate__(self):
        state = super().__getstate__()
        model = state.pop("model_", None)
        if model is not None and self.weights is None:  # random weights cannot be rebuilt
            state["_random_weights"] = model.get_weights()
        return state

    def _model(self):
        if "model_" not in self.__dict__:  # unpickled
            self.model_, _ = self._build_model()
            random_weights = self.__dict__.pop("_random_weights", None)
            if random_weights is not None:
                self.model_.set_weights(random_weights)
        return self.model_

    # --- helpers ------------------------------------------------------------------------------------

    def _check_params(self) -> int:
        """Validates every parameter, without building anything; returns the input size."""
        from transferkit.models.surgery import POOLING

        info = get_backbone_info(self.backbone)
        layers = [self.layer] if isinstance(self.layer, str) else self.layer
        if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"layer must be 'top', a layer name or a non-empty list of them, got {self.layer!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {self.pooling!r}")
        if not isinstance(self.batch_size, numbers.Integral) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.options, (dict, type(None))):
            raise ValueError(f"options must be a dict of backbone arguments, got {self.options!r}")
        size = int(self.image_size or info.default_size)
        check_weights(info.name, self.weights, size, self.alpha, **(self.options or {}))
        return size

    def _build_model(self):
        """(model, ((layer, width), ...)), from the cache unless the weights are random."""
        layers = (self.layer,) if isinstance(self.layer, str) else tuple(self.layer)
        build = _feature_model.__wrapped__ if self.weights is None else _feature_model
        weights = self.weights if self.weights in (None, "imagenet") else _file_key(self.weights)
        options = json.dumps(self.options or {}, sort_keys=True)  # hashable, for the cache
        return build(get_backbone_info(self.backbone).name, weights, self.image_size_, self.alpha, options,
                     layers, self.pooling)


def predict_in_batches(model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """``model`` on ``pixels`` batch by batch (``predict_on_batch``): without the data adapter that
    ``predict`` puts around an array, about twice as fast on CPU."""
    pixels = np.asarray(pixels, dtype="float32")
    return np.concatenate([np.asarray(model.predict_on_batch(pixels[i:i + batch_size]))
                           for i in range(0, len(pixels), batch_size)])


def pixels_of(images, image_size: int) -> np.ndarray:
    """float32 `[n, S, S, 3]` from a list of image files (decoded) or from pixels (resized)."""
    from transferkit.data.decode import load_images, resize_all

    if isinstance(images, list):
        return load_images(images, image_size).astype(np.float32)
    return resize_all(images, image_size).astype(np.float32)


def clear_model_cache() -> None:
    """Forgets the cached feature models and backbones (frees their memory)."""
    _feature_model.cache_clear()
    _backbone.cache_clear()
    _finished.cache_clear()


@functools.lru_cache(maxsize=2)
def _backbone(name, weights, image_size, alpha, options):
    """`create_backbone`; `options` are its extra arguments as JSON."""
    from transferkit.models.backbones import create_backbone

    weights = weights[0] if isinstance(weights, tuple) else weights
    return create_backbone(name, weights=weights, image_size=image_size, alpha=alpha, **json.loads(options))


@functools.lru_cache(maxsize=8)
def _feature_model(name, weights, image_size, alpha, options, layers, pooling):
    """The cut model and `((resolved layer, width), ...)`; `weights` may be `(path, mtime)`."""
    from transferkit.models.backbones import resolve_layer
    from transferkit.models.surgery import cut

    body = (_backbone.__wrapped__ if weights is None else _backbone)(name, weights, image_size, alpha, options)
    names = [resolve_layer(body, layer) for layer in layers]
    return cut(body, names, pooling), tuple((n, int(body.get_layer(n).output.shape[-1])) for n in names)


@functools.lru_cache(maxsize=4)  # a wrapper holds its model: few are kept
def _finished(model, tta: bool, power_norm: bool):
    """`model`, averaged over each image and its mirror image (test-time augmentation) and followed by
    a signed square root as asked, built once per model."""
    from transferkit.models.surgery import average_over_flips, power_normalize

    if tta:
        model = average_over_flips(model)
    return power_normalize(model) if power_norm else model


def _file_key(path) -> tuple[str, int]:
    """A weights file as a cache key: a file rewritten in place is a new key."""
    path = Path(path).expanduser().resolve()
    return str(path), path.stat().st_mtime_ns


def _as_images(X):
    """A list of path strings, or a numeric array `[N, H, W, 3]`."""
    if isinstance(X, np.ndarray) and X.dtype.kind in "uif":
        if X.ndim != 4 or X.shape[-1] != 3:
            raise ValueError(f"pixel arrays must be [N, height, width, 3] RGB, got shape {X.shape}: "
                             "stack RGB images, or pass file paths")
        return X
    if isinstance(X, (str, Path)):
        raise ValueError(f"X must be a list of image paths, got the single path {os.fspath(X)!r}: wrap it in a list")
    try:
        return [os.fspath(path) for path in X]
    except TypeError:
        raise ValueError("X must be image paths (str or Path) or an RGB pixel array [N, H, W, 3], "
                         f"got {type(X).__name__}") from None

