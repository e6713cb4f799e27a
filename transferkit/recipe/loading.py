"""Loading a recipe: a YAML file (or a mapping) and overrides in, a checked :class:`Recipe` out."""

from __future__ import annotations

from pathlib import Path

from transferkit.data.augment import AUGMENTATIONS, is_import_path
from transferkit.data.balance import check_class_weight, check_sampling
from transferkit.data.labels import has_split_column
from transferkit.errors import RecipeError
from transferkit.recipe.messages import did_you_mean, kind_of
from transferkit.recipe.reading import apply_overrides, parse_yaml, read_recipe_text
from transferkit.recipe.schema import Recipe
from transferkit.recipe.search import check_space, parse_duration
from transferkit.recipe.validation import build_spec


def load_recipe(source: str | Path | dict, *, overrides: list[str] = (), base_dir=None) -> Recipe:
    """Read, validate and complete a recipe.

    Everything that can be checked without importing Keras is checked here: keys, types, ranges
    and upper bounds (every number finite), the YAML itself (UTF-8, at most
    :data:`~transferkit.recipe.schema.MAX_YAML_VALUES` values once aliases are expanded), one
    unfreeze mode, augmentation names. `transferkit.strategies.check_recipe` checks the rest (layer
    names against the backbone, import paths, optimizer and classifier names) before any slow work.

    Args:
        source: a YAML file, or an already parsed mapping.
        overrides: ``key.path=value`` strings applied on top (values parsed as YAML),
            e.g. ``["finetune.epochs=2", "data.batch_size=16"]``. An override that sets one
            unfreeze mode (``finetune.unfreeze.all=true``) replaces the recipe's other mode.
        base_dir: folder that relative paths resolve against; default: the recipe's folder
            (the current folder for a mapping).

    Returns:
        A :class:`Recipe` with every default filled in and every path absolute.

    Raises:
        RecipeError: one line naming the key, the value and what is expected.
    """
    where = "recipe"
    if isinstance(source, dict):
        raw, name = source, None
    else:
        path = Path(source)
        where = str(path)
        raw = parse_yaml(read_recipe_text(path), where)
        name, base_dir = path.stem, base_dir or path.parent
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys (data:, backbone:, ...), got {kind_of(raw)}")
    raw = apply_overrides(dict(raw), overrides)
    try:
        base = Path(base_dir or Path.cwd()).resolve()
        recipe = build_spec(Recipe, raw, "", base)
        _check_consistency(recipe)
        _fixed_splits(recipe, raw)
        _check_tune(recipe, raw, base)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    if recipe.name is None:
        recipe.name = name or "run"
    if recipe.output is None:
        recipe.output = str(Path.cwd().resolve() / "runs" / recipe.name)
    return recipe


def _check_consistency(recipe: Recipe) -> None:
    """Rules that involve more than one key: one unfreeze mode, one class weight key, known augmentation names."""
    recipe.finetune.unfreeze.mode()
    if recipe.finetune.unfreeze.batchnorm_momentum is not None and not recipe.finetune.unfreeze.train_batchnorm:
        raise RecipeError("finetune.unfreeze.batchnorm_momentum: acts only on BatchNorm layers that train: "
                          "add finetune.unfreeze.train_batchnorm: true, or leave it out")
    _one_class_weight_key(recipe)
    for i, spec in enumerate(recipe.data.augment):
        name = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else spec
        if not isinstance(name, str):
            raise RecipeError(f"expected a name or {{name: arguments}}, e.g. random_flip or {{random_rotation: 0.1}}, "
                              f"got {spec!r}", key=f"data.augment[{i}]")
        if name not in AUGMENTATIONS and not is_import_path(name):  # a path is imported by validate
            raise RecipeError(f"unknown augmentation {name!r}{did_you_mean(name, AUGMENTATIONS)}",
                              key=f"data.augment[{i}]")


def _fixed_splits(recipe: Recipe, raw: dict) -> None:
    """A labels CSV with a split column fixes the val and test images: data.val and data.test are then left
    out (set to null here, so the recipe a run saves says so) or null."""
    if not has_split_column(recipe.data.train):
        return
    for key in ("val", "test"):
        if (raw.get("data") or {}).get(key) is not None:
            raise RecipeError(f"{recipe.data.train} has a split column, which fixes the {key} images: remove "
                              f"data.{key} (or set it to null), or drop the column", key=f"data.{key}")
    recipe.data.val = recipe.data.test = None


def _one_class_weight_key(recipe: Recipe) -> None:
    """``data.class_weight``, checked; ``extract.classifier.class_weight``, its older name, is moved
    there (older recipes keep working) unless both are given."""
    older = recipe.extract.classifier.class_weight
    if older is not None:
        if recipe.data.class_weight is not None:
            raise RecipeError("data.class_weight is the one key for both strategies: give it alone, not both",
                              key="extract.classifier.class_weight")
        recipe.data.class_weight, recipe.extract.classifier.class_weight = older, None
    with RecipeError.under("data.class_weight"):
        check_class_weight(recipe.data.class_weight)
    check_sampling(recipe.data.sampling, recipe.data.class_weight)


def _check_tune(recipe: Recipe, raw: dict, base: Path) -> None:
    """The tune section: a duration, and every value of the search space one the recipe accepts."""
    parse_duration(recipe.tune.budget)
    if recipe.tune.space:
        check_space(raw, lambda variant: _check_consistency(build_spec(Recipe, variant, "", base)))


def recipe_splits(recipe: Recipe, screen: bool = True):
    """The recipe's train/val/test images, split with ``data.split_seed`` (default: the recipe's seed).
    ``screen=False`` only lists the folders (see :func:`transferkit.data.splits.load_splits`)."""
    from transferkit.data.splits import load_splits

    data = recipe.data
    return load_splits(data.train, data.val, data.test,
                       seed=recipe.seed if data.split_seed is None else data.split_seed,
                       follow_links=data.follow_links, screen=screen)
