"""Feature extraction: cut the backbone, cache pooled features in HDF5, fit a scikit-learn classifier.

The run folder is written beside the output folder and put in place in one step when complete
(see :mod:`transferkit.outputs`): a failure or a kill leaves the previous run folder as it was.

Example:
    >>> run = extract(load_recipe("recipes/digits.yaml"))
    >>> run.metrics["val"]["top1"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from transferkit.training.accelerator import out_of_memory
from transferkit.data.balance import class_weights
from transferkit.data.sources import ImageSet
from transferkit.errors import DeviceMemoryError, RecipeError
from transferkit.features.store import FeatureStore, cache_key
from transferkit.features.transformer import FeatureExtractor, pixels_of, predict_in_batches
from transferkit.io import disk_full_is_one_line, transferkit_home
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import OutputFolder
from transferkit.recipe import ClassifierSpec, Recipe, load_recipe, recipe_splits
from transferkit.run import FeaturePredictor, Run
from transferkit.strategies import check_data, preflight
from transferkit.strategies.tracking import track_run

log = logging.getLogger("transferkit")


def extract(recipe: Recipe | str | Path, *, progress: bool = True, evaluate_test: bool = True) -> Run:
    """Train the extract strategy end to end and write its run folder.

    Args:
        recipe: a :class:`Recipe` or the path of a recipe file.
        progress: show extraction progress on stderr.
        evaluate_test: evaluate the recipe's test split; False keeps it held out, its features not
            even extracted (the tuner's trials: only the winner sees it).

    Returns:
        The :class:`Run`, already saved to ``recipe.output``, with ``metrics["val"]`` (and
        ``metrics["test"]`` when the recipe has a test set).

    Raises:
        ResourceError: another run uses the output folder, or the disk is full.
        DeviceMemoryError: the device ran out of memory extracting features (those extracted are kept).
    """
    log_to_stderr_unless_configured()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    started = time.perf_counter()
    image_size = preflight(recipe)
    with OutputFolder(recipe.output) as out, disk_full_is_one_line(out.partial, then=", then run again"):
        run = _extract(recipe, image_size, out.partial, progress, started, evaluate_test)
        run.save(out.partial)
        out.commit()
    run.folder = out.path
    log.info("run saved to %s (%.1fs)", out.path, run.info["seconds"]["total"])
    return run


def _extract(recipe: Recipe, image_size: int, folder: Path, progress: bool, started: float,
             evaluate_test: bool = True) -> Run:
    """Features, the classifier fit and the reports (written to ``folder``); the Run, unsaved."""
    from transferkit.features.classifiers import cv_scores, fit_cached, predict_proba
    from transferkit.reports.calibration import write_calibrated_reports
    from transferkit.reports.evaluate import format_metrics

    splits = check_data(recipe, screen=True)
    extractor = feature_extractor(recipe, image_size)
    sets = _named_sets(splits)
    if not evaluate_test:
        sets.pop("test", None)
    features = cached_features(recipe, extractor, image_size, sets, progress)
    extracted = time.perf_counter()

    train_x, train_y = features["train"]
    classifier = recipe_classifier(recipe, recipe.extract.classifier, train_y, splits.class_names)
    classifier, reused = fit_cached(classifier, train_x, train_y, transferkit_home() / "classifiers")
    fitted = time.perf_counter()
    if reused:
        log.info("classifier: the same features and settings were fitted before; reusing that fit")
    scores = cv_scores(classifier)
    if scores:
        log.info("classifier: best %s by %s (cv log-loss %.3f, accuracy %.3f)", classifier.best_params_,
                 recipe.extract.classifier.select_by.replace("_", "-"), scores["log_loss"], scores["accuracy"])

    run = Run(recipe=recipe, class_names=splits.class_names, image_size=image_size,
              predictor=FeaturePredictor(extractor, classifier))
    raw = {name: (features[name][1], predict_proba(classifier, features[name][0])) for name in ("val", "test")
           if name in features}
    temperature, run.metrics = write_calibrated_reports(
        folder, raw, splits.class_names, paths={name: sets[name].paths for name in raw},
        fit=recipe.calibrate == "temperature")
    run.predictor = run.predictor.with_temperature(temperature)
    for name, metrics in run.metrics.items():
        log.info("%s: %s", name, format_metrics(metrics))
    run.info = {"seconds": {"extract": round(extracted - started, 2), "fit": round(fitted - extracted, 2),
                            "total": round(time.perf_counter() - started, 2)},
                "images": {name: len(images) for name, images in sets.items()},
                "skipped_files": [list(item) for item in splits.skipped],  # each once, not once per split
                "feature_dim": int(train_x.shape[1]),
                "best_params": getattr(classifier, "best_params_", None), "cv": scores}
    track_run(run, folder)
    return run


def recipe_classifier(recipe: Recipe, spec: ClassifierSpec, labels: np.ndarray, class_names: list[str]):
    """The unfitted classifier ``spec`` describes, for training images of class ``labels``, with the
    weights of ``data.class_weight`` (``balanced``: counted on ``labels``) as ``{label: weight}``."""
    from transferkit.features.classifiers import build_classifier

    setting = recipe.data.class_weight if recipe.data.class_weight is not None else spec.class_weight
    weights = class_weights(setting, labels, class_names)
    if weights is not None:
        log.info("class weights: %s", ", ".join(f"{name} {w:.3g}" for name, w in zip(class_names, weights)))
    with RecipeError.under("extract.classifier"):  # checked before (preflight): data.class_weight's support too
        return build_classifier(**{**dataclasses.asdict(spec), "class_weight": None if weights is None else
                                   dict(enumerate(weights.tolist()))},
                                seed=recipe.seed, n_samples_per_class=int(np.bincount(labels).min()))


def feature_extractor(recipe: Recipe, image_size: int):
    """The Keras model, raw images -> features, of the recipe's `FeatureExtractor`: the backbone cut at
    ``extract.layer``, pooled, with flip averaging and power norm as set."""
    spec, extract = recipe.backbone, recipe.extract
    extractor = FeatureExtractor(spec.name, layer=extract.layer, weights=spec.weights, image_size=image_size,
                                 alpha=spec.alpha, pooling=extract.pooling, batch_size=recipe.data.batch_size,
                                 tta=extract.tta, power_norm=extract.power_norm, options=spec.options)
    model = extractor.fit(None).feature_model()
    log.info("features: %s at %s, %d values per image", spec.name, extract.layer, model.output.shape[-1])
    return model


def cache_features(recipe: Recipe, progress: bool = True) -> None:
    """Compute a recipe's features into the feature store, so that its ``extract`` starts from them."""
    log_to_stderr_unless_configured()
    image_size = preflight(recipe)
    cached_features(recipe, feature_extractor(recipe, image_size), image_size,
                     _named_sets(recipe_splits(recipe)), progress)


def _named_sets(splits) -> dict[str, ImageSet]:
    return {name: images for name, images in
            (("train", splits.train), ("val", splits.val), ("test", splits.test)) if images is not None}


def cached_features(recipe: Recipe, extractor, image_size: int, sets: dict[str, ImageSet],
                     progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels per split, read from (or computed into) the shared HDF5 feature store.

    Features are stored per source folder, not per split, so recipes that split the same folder
    differently (other seed, other fraction) reuse the same cached features.
    """
    spec, config = recipe.backbone, _feature_config(recipe, image_size)
    store = FeatureStore(transferkit_home() / "features" / f"{spec.name}-{_digest(config)}.h5")
    embed = _Embedder(extractor, image_size, recipe.data.batch_size)
    by_root: dict[str, dict[str, int]] = {}
    for images in sets.values():
        by_root.setdefault(images.root, {}).update(zip(images.paths, images.labels.tolist()))
    rows: dict[str, np.ndarray] = {}
    for root, labels in by_root.items():
        paths = sorted(labels)
        feats, _ = store.compute(f"{Path(root).name}-{_digest(root)}", paths, np.array([labels[p] for p in paths]),
                                 embed, key=cache_key(**config, files=paths), attrs={**config, "root": root},
                                 progress=progress, dim=int(extractor.output.shape[-1]))
        rows.update(zip(paths, feats))
    return {name: (np.stack([rows[p] for p in images.paths]), images.labels) for name, images in sets.items()}


def _feature_config(recipe: Recipe, image_size: int) -> dict:
    """Everything the features depend on; equal settings give equal values (alpha: null is the
    registry's default width, 1.0)."""
    from transferkit.models.registry import get_backbone_info

    spec = recipe.backbone
    alpha = float(spec.alpha) if spec.alpha is not None else 1.0 if get_backbone_info(spec.name).alphas else None
    return {"backbone": spec.name, "weights": spec.weights, "alpha": alpha, "options": spec.options,
            "layers": recipe.extract.layer, "pooling": recipe.extract.pooling, "image_size": image_size,
            "tta": recipe.extract.tta, "power_norm": recipe.extract.power_norm}


class _Embedder:
    """``paths -> features`` in two stages (see `transferkit.features.store.Embed`): decode with Pillow,
    then run the extractor batch by batch, as `FeatureExtractor.transform` does."""

    def __init__(self, extractor, image_size: int, batch_size: int):
        self.extractor, self.image_size, self.batch_size = extractor, image_size, batch_size

    def load(self, paths: list[str]) -> np.ndarray:
        return pixels_of(paths, self.image_size)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        try:
            return predict_in_batches(self.extractor, pixels, self.batch_size).astype("float32")
        except Exception as error:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
            if not out_of_memory(error):
                raise
            raise DeviceMemoryError(
                f"out of memory extracting features at data.batch_size {self.batch_size} ({self.image_size} px): "
                f"lower it, e.g. --set data.batch_size={max(self.batch_size // 2, 1)}; the features "
                "extracted so far are kept") from None

    def __call__(self, paths: list[str]) -> np.ndarray:
        return self.forward(self.load(paths))


def _digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]
