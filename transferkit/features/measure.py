"""Measure what the decision table asks: is the dataset small, is it similar to ImageNet, which layer.

On a stratified subsample (``images`` in all, at least ``MIN_PER_CLASS`` per class) the backbone
is run once with every cut point as an output (globally average-pooled). Three signals follow:

* **depth sweep**: cross-validated accuracy of a linear probe (signed square root, standardise,
  logistic regression, stratified k-fold) at each cut point;
* **LogME** (`transferkit.features.logme`) at each cut point;
* **ImageNet confidence**: mean max-probability and normalised entropy of an ImageNet classifier
  on the images (the backbone's own top when its weights are cached, else the first backbone
  with a cached top).

Each signal says "similar" or not, and all three are reported:

* sweep: the top layer's probe accuracy is the best of all cut points;
* LogME: the top layer has the highest LogME of all cut points;
* confidence: the mean max-probability is at least ``CONFIDENT``.

The verdict is the sweep's: the data is *similar* when the top layer is the best place to cut, and
the best layer is the sweep's best. LogME and confidence are evidence, not votes: on the shared
datasets (MobileNetV2, 400 images each) the sweep alone separated flowers5 (top best by 0.025)
from dtd10, digits8 and pneumonia28 (an intermediate block best by 0.008-0.013), while LogME ranked
the top first on dtd10 and digits8 but not on flowers5, and a small ImageNet classifier was about
as unsure on flowers5 (mean max-probability 0.19) as on digits8 (0.18). LogME is what ranks
backbones (`rank_backbones`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger("transferkit")

SUBSAMPLE = 400          # images measured, in all
MIN_PER_CLASS = 20
FOLDS = 3
CONFIDENT = 0.30         # mean ImageNet max-probability from which images look like ImageNet's
#: Small ImageNet classifiers tried, in order, when the measured backbone's own top is not cached.
TOP_FALLBACKS = (("mobilenet", 0.25), ("mobilenet_v2", 0.35), ("mobilenet_v2", None), ("mobilenet", None))


@dataclass
class Measurement:
    """What `measure` found, with every figure behind the verdict."""
    backbone: str
    images: int                      # images measured
    layers: list[str]                # cut points, shallow to deep (the last is the top)
    probe: dict[str, float]          # layer -> cross-validated accuracy
    probe_std: dict[str, float]      # layer -> std over folds
    logme: dict[str, float]          # layer -> LogME
    confidence: dict | None          # {"backbone", "mean_max_probability", "mean_entropy"} or None
    signals: dict[str, bool]         # signal -> says "similar" (the depth sweep decides)
    similar: bool
    best_layer: str                  # a cut point name
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def recipe_layer(self) -> str:
        """``best_layer`` as a recipe writes it: "top" for the last cut point."""
        return "top" if self.best_layer == self.layers[-1] else self.best_layer

    def to_dict(self) -> dict:
        return asdict(self)


def measure(images, backbone: str = "mobilenet_v2", alpha: float | None = None, image_size: int | None = None,
            seed: int = 0, subsample: int = SUBSAMPLE, confidence: bool = True) -> Measurement:
    """Measure similarity to ImageNet and the best cut point on a subsample of ``images``.

    Args:
        images: an `transferkit.data.sources.ImageSet`.
        backbone, alpha, image_size: the backbone to measure (its default size when None).
        seed: seeds the subsample and the folds.
        subsample: images to measure, in all (at least `MIN_PER_CLASS` per class).
        confidence: also measure the ImageNet classifier's confidence.
    """
    from transferkit.models.backbones import create_backbone
    from transferkit.models.registry import get_backbone_info
    from transferkit.data.decode import load_images
    from transferkit.features.logme import logme

    started = time.perf_counter()
    info = get_backbone_info(backbone)
    size = image_size or info.default_size
    sample = _subsample(images, subsample, seed)
    log.info("measuring %s on %d images (%dpx): features at %d cut points", info.name, len(sample), size,
             len(info.cut_points))
    pixels = load_images(sample.paths, size).astype("float32")
    body = create_backbone(backbone, image_size=size, alpha=alpha)
    layers = list(info.cut_points)
    features = _pooled_at(body, layers, pixels)
    embedded = time.perf_counter()
    log.info("measuring: linear probe and LogME at each cut point (features took %.0fs)", embedded - started)

    probe, probe_std, scores = {}, {}, {}
    for layer, x in zip(layers, features):
        probe[layer], probe_std[layer] = _probe_accuracy(x, sample.labels, seed)
        scores[layer] = logme(x, sample.labels)
    probed = time.perf_counter()
    confidence, notes = _imagenet_confidence(pixels, backbone, alpha) if confidence else (None, [])
    best = max(layers, key=lambda layer: (probe[layer], layers.index(layer)))  # ties: the deeper layer
    similar = best == layers[-1]
    signals = {"depth sweep": similar, "LogME": max(scores, key=scores.get) == layers[-1]}
    if confidence is not None:
        signals["ImageNet confidence"] = confidence["mean_max_probability"] >= CONFIDENT
    return Measurement(backbone=backbone, images=len(sample), layers=layers, probe=probe, probe_std=probe_std,
                       logme=scores, confidence=confidence, signals=signals, similar=similar, best_layer=best,
                       seconds={"features": round(embedded - started, 2), "probe_and_logme": round(probed - embedded, 2),
                                "total": round(time.perf_counter() - started, 2)},
                       notes=notes)


def rank_backbones(images, candidates, seed: int = 0, subsample: int = SUBSAMPLE, progress: bool = True) -> list[dict]:
    """Measure each ``(name, alpha)`` that has weights; rank them by LogME and by the probe (``progress``:
    log each measurement's steps to stderr, unless logging is configured).

    Returns:
        One row per candidate, best LogME first: ``backbone``, ``alpha``, ``best_layer``, ``logme``
        and ``probe`` (both at the best layer), ``rank_logme``, ``rank_probe``, ``seconds``; or,
        for a candidate without cached weights, ``skipped`` with the reason.
    """
    from transferkit.models.weights import check_weights
    from transferkit.errors import BackboneError
    from transferkit.logs import log_to_stderr_unless_configured

    if progress:
        log_to_stderr_unless_configured()
    rows, skipped = [], []
    for name, alpha in candidates:
        try:
            check_weights(name, alpha=alpha)
        except BackboneError as error:
            skipped.append({"backbone": name, "alpha": alpha, "skipped": str(error)})
            continue
        m = measure(images, name, alpha, seed=seed, subsample=subsample, confidence=False)
        rows.append({"backbone": name, "alpha": alpha, "best_layer": m.recipe_layer,
                     "logme": m.logme[m.best_layer], "probe": m.probe[m.best_layer], "seconds": m.seconds["total"]})
    for key in ("probe", "logme"):
        for rank, row in enumerate(sorted(rows, key=lambda r: -r[key]), start=1):
            row[f"rank_{key}"] = rank
    return sorted(rows, key=lambda r: r["rank_logme"]) + skipped


def plot_depth(measurement: Measurement, path) -> None:
    """Probe accuracy (with the fold spread) and LogME against depth, the best layer marked."""
    from transferkit.reports.evaluate import new_figure, save_png

    m = measurement
    depth = np.arange(1, len(m.layers) + 1)
    accuracy = np.array([m.probe[layer] for layer in m.layers])
    spread = np.array([m.probe_std[layer] for layer in m.layers])
    fig = new_figure(figsize=(9, 4.5))
    ax = fig.subplots()
    ax.plot(depth, accuracy, marker="o", color="C0", label="linear probe (cv accuracy)")
    ax.fill_between(depth, accuracy - spread, accuracy + spread, color="C0", alpha=0.2)
    ax.axvline(m.layers.index(m.best_layer) + 1, color="C3", linestyle="--", label=f"chosen: {m.best_layer}")
    ax.set(xlabel="cut point (shallow to deep)", ylabel="probe accuracy")
    ax.set_xticks(depth, m.layers, rotation=60, ha="right", fontsize=7)
    twin = ax.twinx()
    twin.plot(depth, [m.logme[layer] for layer in m.layers], marker="s", color="C1", label="LogME")
    twin.set_ylabel("LogME")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    fig.suptitle(f"{m.backbone}: {'similar to' if m.similar else 'different from'} ImageNet ({m.images} images)")
    save_png(fig, path)


def _subsample(images, total: int, seed: int):
    """A seeded stratified subsample: ``total // classes`` per class (at least MIN_PER_CLASS), all of a smaller class."""
    rng = np.random.default_rng(seed)
    per_class = max(MIN_PER_CLASS, total // len(images.class_names))
    chosen = []
    for label in range(len(images.class_names)):
        members = np.flatnonzero(images.labels == label)
        chosen.extend(rng.permutation(members)[:per_class].tolist())
    return images.subset(sorted(chosen))


def _pooled_at(body, layers: list[str], pixels: np.ndarray) -> list[np.ndarray]:
    """Globally average-pooled features at each layer, from one forward pass."""
    import keras

    outputs = [keras.layers.GlobalAveragePooling2D()(body.get_layer(layer).output) for layer in layers]
    model = keras.Model(body.inputs[0], outputs)
    return [np.asarray(x, dtype=np.float64) for x in model.predict(pixels, batch_size=32, verbose=0)]


def _probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    """Mean and std over stratified folds of a linear probe's accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    folds = min(FOLDS, int(np.bincount(y).min()))
    probe = make_pipeline(FunctionTransformer(lambda v: np.sign(v) * np.sqrt(np.abs(v))), StandardScaler(),
                          LogisticRegression(C=0.1, max_iter=2000))
    scores = cross_val_score(probe, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(scores.mean()), float(scores.std())


def _imagenet_confidence(pixels: np.ndarray, backbone: str, alpha) -> tuple[dict | None, list[str]]:
    """Mean max-probability and normalised entropy of an ImageNet classifier on the images."""
    from transferkit.models.backbones import create_backbone
    from transferkit.models.weights import check_weights
    from transferkit.data.decode import resize_all
    from transferkit.errors import BackboneError

    for name, candidate_alpha in [(backbone, alpha), *TOP_FALLBACKS]:
        try:
            check_weights(name, image_size=224, alpha=candidate_alpha, include_top=True)
        except BackboneError:
            continue
        top = create_backbone(name, image_size=224, alpha=candidate_alpha, include_top=True)
        resized = resize_all(pixels.astype(np.uint8), 224).astype("float32")  # pixels: whole numbers
        probabilities = np.asarray(top.predict(resized, batch_size=32, verbose=0), dtype=np.float64)
        entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(axis=1) / math.log(1000)
        notes = [] if name == backbone else [f"ImageNet confidence measured with {name}"
                                             f"{f' alpha {candidate_alpha}' if candidate_alpha else ''}: "
                                             f"{backbone}'s top weights are not cached"]
        label = name if candidate_alpha is None else f"{name} (alpha {candidate_alpha})"
        return {"backbone": label, "mean_max_probability": float(probabilities.max(axis=1).mean()),
                "mean_entropy": float(entropy.mean())}, notes
    return None, ["ImageNet confidence skipped: no backbone with cached ImageNet top weights"]

