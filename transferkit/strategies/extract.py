"""Feature extraction: cut the backbone, cache pooled features in HDF5, fit a scikit-learn classifier.

With ``shard=(I, N)`` only shard I of N of the features is computed, into a file of its own, so that N
processes (a job array, several GPUs or hosts on a shared folder) extract at once; the run without a
shard links them and fits the classifier (:mod:`transferkit.features.shards`). Training features larger
than ``extract.max_memory_features`` are classified by ``sgd_streaming`` from disk
(:mod:`transferkit.features.streaming`).

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
import os
import time
from pathlib import Path

import numpy as np

from transferkit.training.accelerator import out_of_memory
from transferkit.data.balance import class_weights
from transferkit.data.sources import ImageSet
from transferkit.errors import DeviceMemoryError, RecipeError
from transferkit.features.shards import check_shard, compute_shard, link_shards
from transferkit.features.store import FeatureStore, cache_key
from transferkit.features.streaming import STREAMING, StoredFeatures
from transferkit.features.transformer import FeatureExtractor, pixels_of, predict_in_batches
from transferkit.io import disk_full_is_one_line, transferkit_home
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import OutputFolder
from transferkit.recipe import ClassifierSpec, Recipe, load_recipe, recipe_splits
from transferkit.run import FeaturePredictor, Run
from transferkit.strategies import check_data, preflight
from transferkit.strategies.tracking import track_run

log = logging.getLogger("transferkit")


def extract(recipe: Recipe | str | Path, *, progress: bool = True, evaluate_test: bool = True,
            shard: tuple[int, int] | None = None) -> Run | None:
    """Train the extract strategy end to end and write its run folder.

    Args:
        recipe: a :class:`Recipe` or the path of a recipe file.
        progress: show extraction progress on stderr.
        evaluate_test: evaluate the recipe's test split; False keeps it held out, its features not
            even extracted (the tuner's trials: only the winner sees it).
        shard: ``(I, N)``, I from 1 to N: compute shard I of N of the features into its own file and stop
            (no classifier, no run folder); once every shard is done, a call without ``shard`` fits.

    Returns:
        The :class:`Run`, already saved to ``recipe.output``, with ``metrics["val"]`` (and
        ``metrics["test"]`` when the recipe has a test set); None for a shard.

    Raises:
        ResourceError: another run uses the output folder, or the disk is full.
        DeviceMemoryError: the device ran out of memory extracting features (those extracted are kept).
        ShardsMissing: the features were extracted in shards and some are missing (before any slow work).
    """
    log_to_stderr_unless_configured()
    shard = None if shard is None else check_shard(shard)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    started = time.perf_counter()
    image_size = preflight(recipe)
    if shard is not None:
        _extract_shard(recipe, image_size, shard, progress)
        return None
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
    from transferkit.features.classifiers import cv_scores
    from transferkit.reports.calibration import write_calibrated_reports
    from transferkit.reports.evaluate import format_metrics

    splits = check_data(recipe, screen=True)
    sets = _named_sets(splits)
    if not evaluate_test:
        sets.pop("test", None)
    layout = FeatureLayout(recipe, image_size, sets)
    layout.link_shards()  # shards missing: fail now, before the backbone is built
    extractor = feature_extractor(recipe, image_size)
    stored = layout.compute(extractor, recipe.data.batch_size, progress)
    extracted = time.perf_counter()

    classifier, raw = _fit_and_predict(recipe, stored, splits.class_names)
    fitted = time.perf_counter()
    scores = cv_scores(classifier)
    if scores:
        log.info("classifier: best %s by %s (cv log-loss %.3f, accuracy %.3f)", classifier.best_params_,
                 recipe.extract.classifier.select_by.replace("_", "-"), scores["log_loss"], scores["accuracy"])

    run = Run(recipe=recipe, class_names=splits.class_names, image_size=image_size,
              predictor=FeaturePredictor(extractor, classifier))
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
                "feature_dim": stored["train"].dim,
                "best_params": getattr(classifier, "best_params_", None), "cv": scores}
    track_run(run, folder)
    return run


def _fit_and_predict(recipe: Recipe, stored: dict[str, StoredFeatures], class_names: list[str]):
    """The classifier fitted on the train split, and ``{split: (labels, probabilities)}`` of val and test;
    streamed from disk (``sgd_streaming``) when the recipe names it or the train features are too large."""
    from transferkit.features.classifiers import fit_cached, predict_proba
    from transferkit.features.streaming import fit_streaming, predict_proba_streaming

    spec, train, evaluated = recipe.extract.classifier, stored["train"], [n for n in ("val", "test") if n in stored]
    if _streams(recipe, train.nbytes):
        sgd = recipe_classifier(recipe, spec if spec.name == STREAMING else ClassifierSpec(STREAMING),
                                train.labels, class_names)[-1]  # checked, with data.class_weight's weights
        with train.open() as features:
            model = fit_streaming(features, train.labels, train.rows, params=sgd.get_params(),
                                  class_weight=sgd.class_weight, standardize=spec.standardize,
                                  classes=np.arange(len(class_names)), seed=recipe.seed)
        raw = {}
        for name in evaluated:
            with stored[name].open() as features:
                raw[name] = (stored[name].labels, predict_proba_streaming(model, features, stored[name].rows))
        return model, raw
    train_x = train.load()
    classifier, reused = fit_cached(recipe_classifier(recipe, spec, train.labels, class_names), train_x,
                                    train.labels, transferkit_home() / "classifiers")
    if reused:
        log.info("classifier: the same features and settings were fitted before; reusing that fit")
    del train_x
    return classifier, {name: (stored[name].labels, predict_proba(classifier, stored[name].load())) for name in evaluated}


def _streams(recipe: Recipe, nbytes: int) -> bool:
    """Whether the classifier is fitted from disk: named ``sgd_streaming``, or ``nbytes`` of training features
    exceed ``extract.max_memory_features`` (MiB; auto: a quarter of the RAM)."""
    spec = recipe.extract
    if spec.classifier.name == STREAMING:
        return True
    limit = spec.max_memory_features
    limit = _physical_memory() / 4 if limit == "auto" else float(limit) * 2**20
    if nbytes <= limit:
        return False
    log.warning("classifier: the training features (%.0f MiB) exceed extract.max_memory_features (%.0f MiB): "
                "fitting %s from disk instead of %s; set extract.classifier.name: %s to choose it, or raise "
                "extract.max_memory_features", nbytes / 2**20, limit / 2**20, STREAMING, spec.classifier.name,
                STREAMING)
    return True


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf: never stream unasked
        return float("inf")


def recipe_classifier(recipe: Recipe, spec: ClassifierSpec, labels: np.ndarray, class_names: list[str]):
    """The unfitted classifier ``spec`` describes, for training images of class ``labels``, with the
    weights of ``data.class_weight`` (``balanced``: counted on ``labels``) as ``{label: weight}``;
    ``data.sampling: balanced`` adds balanced weights (what the sampling gives in expectation)."""
    from transferkit.features.classifiers import build_classifier

    setting = recipe.data.class_weight if recipe.data.class_weight is not None else spec.class_weight
    weights = class_weights(setting, labels, class_names, sampling=recipe.data.sampling)
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
    """Features and labels per split, read from (or computed into) the shared HDF5 feature store."""
    layout = FeatureLayout(recipe, image_size, sets)
    layout.link_shards()
    stored = layout.compute(extractor, recipe.data.batch_size, progress)
    return {name: (features.load(), features.labels) for name, features in stored.items()}


def _extract_shard(recipe: Recipe, image_size: int, shard: tuple[int, int], progress: bool) -> None:
    """Compute shard ``(I, N)`` of the recipe's features into its own file (see :mod:`transferkit.features.shards`)."""
    layout = FeatureLayout(recipe, image_size, _named_sets(check_data(recipe, screen=True)))
    extractor = feature_extractor(recipe, image_size)
    layout.compute(extractor, recipe.data.batch_size, progress, shard=shard)
    log.info("shard %d/%d done; run without --shard (or each other shard) to fit the classifier", *shard)


class FeatureLayout:
    """Where a recipe's features lie: its feature store, and one group per source folder of ``sets``.

    Features are stored per source folder, not per split, so recipes that split the same folder
    differently (other seed, other fraction) reuse the same cached features.
    """

    def __init__(self, recipe: Recipe, image_size: int, sets: dict[str, ImageSet]):
        config = _feature_config(recipe, image_size)
        self.store = FeatureStore(transferkit_home() / "features" / f"{recipe.backbone.name}-{_digest(config)}.h5")
        self.sets, self.groups, self.image_size = sets, [], image_size
        by_root: dict[str, dict[str, int]] = {}
        for images in sets.values():
            by_root.setdefault(images.root, {}).update(zip(images.paths, images.labels.tolist()))
        for root, labels in by_root.items():
            paths = sorted(labels)
            self.groups.append({"split": f"{Path(root).name}-{_digest(root)}", "paths": paths,
                                "labels": np.array([labels[p] for p in paths]),
                                "key": cache_key(**config, files=paths), "attrs": {**config, "root": root}})

    def link_shards(self) -> None:
        """Link the groups extracted in shards into the store. Raises ShardsMissing: some shards are missing."""
        for group in self.groups:
            link_shards(self.store, group["split"], len(group["paths"]), key=group["key"])

    def compute(self, extractor, batch_size: int, progress: bool,
                shard: tuple[int, int] | None = None) -> dict[str, StoredFeatures] | None:
        """Compute what the store lacks (only shard ``(I, N)`` of it, into the shard's file, if given).

        Returns:
            Each split's :class:`StoredFeatures` (None for a shard): nothing is read into memory.
        """
        embed, dim = _Embedder(extractor, self.image_size, batch_size), int(extractor.output.shape[-1])
        rows = {}
        for group in self.groups:
            name, options = group["split"], {"key": group["key"], "attrs": group["attrs"], "progress": progress,
                                             "dim": dim}
            if shard is not None:
                compute_shard(self.store, name, group["paths"], group["labels"], embed, shard=shard, **options)
                continue
            self.store.compute(name, group["paths"], group["labels"], embed, load=False, **options)
            rows.update((path, (name, row)) for row, path in enumerate(group["paths"]))
        if shard is not None:
            return None
        return {name: StoredFeatures(self.store.path, rows[images.paths[0]][0], np.array([rows[p][1] for p in images.paths]),
                                     images.labels, dim) for name, images in self.sets.items()}


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
