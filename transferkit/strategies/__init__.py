"""The ways to train: each returns a transferkit.run.Run.

`check_recipe` (the strategies call it as `preflight`) checks everything about a recipe that can be
known before the slow work, so a recipe that `transferkit validate` accepts does not fail after
an hour of extraction or a warm-up epoch: `load_recipe` has checked keys, types, finite numbers
and bounds; this adds the weights file, layer names against the backbone, import paths and their
signatures, optimizer, schedule, classifier and augmentation settings, for the sections the
recipe's strategy uses.
"""

from __future__ import annotations

import dataclasses

from transferkit.models.backbones import check_layer
from transferkit.models.registry import get_backbone_info
from transferkit.models.weights import check_weights
from transferkit.errors import RecipeError
from transferkit.recipe import Recipe, did_you_mean, recipe_splits

#: What fine-tuning logs each epoch, so what early stopping and a plateau schedule can monitor (top5 from
#: six classes on).
MONITORED = ("val_loss", "val_accuracy", "val_top5", "loss", "accuracy", "top5")


def check_recipe(recipe: Recipe, *, weights: bool = True, own_backbone: bool = False) -> int:
    """Check what can fail before any slow work: nothing is trained, no image is read.

    Keras is imported only when a check needs it (optimizers, augmentation, a layer name that is not
    one of the backbone's registered cut points: its architecture is built once without weights).

    Args:
        recipe: a loaded recipe.
        weights: also check that the backbone's weights file is there or can be downloaded.
        own_backbone: the caller trains a Keras model of its own instead of ``recipe.backbone``, so
            neither its weights nor layer names are checked.

    Returns:
        The input image size: the recipe's, or the backbone's default.

    Raises:
        TransferkitError: one line naming the recipe key and the fix.
    """
    from transferkit.strategies.tracking import check_tracking

    check_tracking(recipe)
    if weights and not own_backbone:
        check_recipe_weights(recipe)
    if recipe.strategy == "extract":
        _check_extract(recipe)
    else:
        _check_finetune(recipe, layers=not own_backbone)
    return _image_size(recipe)


def check_data(recipe: Recipe, *, screen: bool = False):
    """The recipe's splits, and the checks that need its class names (``data.class_weight``, imag's ``mapping``).

    ``screen=False`` (what `transferkit validate` does) lists the folders without reading an image;
    the strategies screen the files. Raises DataError or RecipeError, one line each.
    """
    from transferkit.data.balance import check_class_weight

    splits = recipe_splits(recipe, screen=screen)
    with RecipeError.under("data.class_weight"):
        check_class_weight(recipe.data.class_weight, splits.class_names)
    if recipe.strategy == "imag":
        from transferkit.training.imag import label_mapping

        with RecipeError.under("imag"):
            mapping = label_mapping(recipe.imag.mapping, splits.class_names, seed=recipe.seed)
        _warn_about_shared_labels(mapping, splits.class_names)
    return splits


def _warn_about_shared_labels(mapping, class_names: list[str]) -> None:
    """A one-way ``{deer: cat}`` gives two classes one imagined label: allowed, but said."""
    import warnings

    shared = {}
    for source, target in enumerate(mapping):
        shared.setdefault(int(target), []).append(class_names[source])
    merged = ["+".join(names) + f" -> {class_names[target]}" for target, names in shared.items() if len(names) > 1]
    if merged:
        warnings.warn(f"imag.mapping merges classes in imag episodes ({'; '.join(merged)}): the fresh head learns "
                      f"fewer labels than there are classes; map both ways (e.g. {{deer: cat, cat: deer}}) for a "
                      f"permutation", UserWarning, stacklevel=2)


def check_recipe_weights(recipe: Recipe) -> None:
    """The part of `check_recipe` that needs no Keras: backbone, alpha, size and weights file."""
    spec = recipe.backbone
    check_weights(spec.name, spec.weights, _image_size(recipe), spec.alpha, **spec.options)


def _image_size(recipe: Recipe) -> int:
    return recipe.data.image_size or get_backbone_info(recipe.backbone.name).default_size


def preflight(recipe: Recipe) -> int:
    """`check_recipe`, as every strategy calls it first. Returns the input image size."""
    return check_recipe(recipe)


def _check_extract(recipe: Recipe) -> None:
    from transferkit.features.classifiers import check_classifier

    layers = recipe.extract.layer
    for i, layer in enumerate([layers] if isinstance(layers, str) else layers):
        _check_layer(recipe, layer, "extract.layer" if isinstance(layers, str) else f"extract.layer[{i}]")
    spec = recipe.extract.classifier
    with RecipeError.under("extract.classifier"):  # name, estimator class, parameters, grid: short of fitting
        check_classifier(spec.name, params=spec.params, grid=spec.grid)
    if recipe.data.class_weight is not None:  # the classifier must take the weights data.class_weight gives
        with RecipeError.under("data"):
            check_classifier(spec.name, params=spec.params, grid=spec.grid, class_weight=recipe.data.class_weight)
    elif recipe.data.sampling == "balanced":  # ... or the balanced weights that stand for balanced sampling
        try:
            check_classifier(spec.name, params=spec.params, grid=spec.grid, class_weight="balanced")
        except RecipeError:
            raise RecipeError(f"{spec.name} takes no class weights, which is how a classifier fitted on every feature "
                              "at once is balanced: use logistic_regression, linear_svm or random_forest, or "
                              "sampling: shuffle", key="data.sampling") from None


def _check_finetune(recipe: Recipe, layers: bool = True) -> None:
    from transferkit.data.augment import check_augmentation
    from transferkit.training.optim import check_optimizer
    from transferkit.training.schedules import check_schedule

    warmup, finetune = recipe.warmup, recipe.finetune
    _check_head(recipe.head, "head")
    if recipe.strategy == "imag" and recipe.imag.head is not None:
        _check_head(recipe.imag.head, "imag.head")
    if warmup.linear_probe:
        if recipe.head.layers or recipe.head.custom:
            raise RecipeError("warmup.linear_probe: needs the built-in head without hidden layers "
                              "(head.layers: [], no head.custom); or use warmup.epochs instead")
        if recipe.head.pooling == "flatten":
            raise RecipeError("warmup.linear_probe: works with head.pooling avg or max, not flatten")
    elif warmup.epochs:
        with RecipeError.under("warmup.optimizer"):
            check_optimizer(**dataclasses.asdict(warmup.optimizer))
    if finetune.epochs and layers:
        _check_unfreeze(recipe)
    if finetune.epochs:
        with RecipeError.under("finetune.optimizer"):
            check_optimizer(**dataclasses.asdict(finetune.optimizer))
        schedule = dataclasses.asdict(finetune.schedule)
        with RecipeError.under("finetune.schedule"):
            check_schedule(schedule.pop("name"), finetune.optimizer.learning_rate, finetune.epochs, **schedule)
        watched = {"finetune.early_stopping.monitor": finetune.early_stopping and finetune.early_stopping.monitor,
                   "finetune.schedule.monitor": finetune.schedule.name == "plateau" and finetune.schedule.monitor}
        for key, monitor in watched.items():
            if monitor and monitor not in MONITORED:
                raise RecipeError(f"{key}: {monitor!r} is not logged{did_you_mean(monitor, MONITORED)}")
    with RecipeError.under("data.augment"):
        check_augmentation(recipe.data.augment)


def _check_head(head, section: str) -> None:
    from transferkit.models.heads import check_head

    with RecipeError.under(section):
        check_head(layers=[dataclasses.asdict(layer) for layer in head.layers], custom=head.custom)


def _check_unfreeze(recipe: Recipe) -> None:
    mode, value = recipe.finetune.unfreeze.mode()
    if mode == "from" and value is not None:
        _check_layer(recipe, value, "finetune.unfreeze.from")
    elif mode == "top_blocks":
        info = get_backbone_info(recipe.backbone.name)
        if value >= len(info.cut_points):  # fewer always fit: every cut point but the last ends a block
            from transferkit.models.backbones import layer_names
            from transferkit.models.surgery import check_top_blocks

            spec = recipe.backbone
            with RecipeError.under("finetune.unfreeze"):
                check_top_blocks(value, layer_names(spec.name, spec.alpha, **spec.options), info)


def _check_layer(recipe: Recipe, layer: str, key: str) -> None:
    spec = recipe.backbone
    check_layer(spec.name, layer, key, spec.alpha, **spec.options)
