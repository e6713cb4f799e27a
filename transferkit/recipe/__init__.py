"""Recipes: YAML in, validated and typed objects with every default filled in.

A recipe is a tree of dataclasses. One generic validator walks that tree using the type hints,
so the schema is the single place that says which keys exist, their types, ranges and defaults.
Errors name the full key path, the value and what is expected, with a did-you-mean for unknown
keys. Relative paths resolve against the recipe file's folder.

The package, in the order a recipe goes through it:

- ``schema.py``: the spec dataclasses (:class:`DataSpec` ... :class:`Recipe`) and upper bounds;
- ``reading.py``: the file's text, YAML read safely (aliases bounded), ``--set`` overrides;
- ``validation.py``: the walk over the type hints that builds the specs;
- ``loading.py``: :func:`load_recipe`, which puts them together, and :func:`recipe_splits`;
- ``imports.py``: the functions and classes a recipe names by import path;
- ``search.py``: the ``tune:`` section's search space and budget;
- ``messages.py``: the wording errors share (did-you-mean tails).

Example:
    >>> recipe = load_recipe("recipes/digits.yaml")
    >>> recipe.backbone.name, recipe.extract.classifier.name
    ('mobilenet_v2', 'logistic_regression')
"""

from transferkit.recipe.imports import check_arguments, import_object
from transferkit.recipe.loading import load_recipe, recipe_splits
from transferkit.recipe.messages import did_you_mean
from transferkit.recipe.search import Parameter, parse_duration, parse_space, with_values
from transferkit.recipe.schema import (
    BUILTIN_PREFIX, MAX_BATCH_SIZE, MAX_DENSE_UNITS, MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_RECIPE_BYTES, MAX_SEED,
    MAX_YAML_VALUES, UNFREEZE_MODES, BackboneSpec, ClassifierSpec, DataSpec, DenseSpec, EarlyStoppingSpec,
    ExtractSpec, FinetuneSpec, HeadSpec, ImagSpec, OptimizerSpec, Recipe, ScheduleSpec, TuneSpec, UnfreezeSpec, WarmupSpec,
)

__all__ = [
    "BUILTIN_PREFIX", "MAX_BATCH_SIZE", "MAX_DENSE_UNITS", "MAX_EPOCHS", "MAX_IMAGE_SIZE", "MAX_RECIPE_BYTES",
    "MAX_SEED", "MAX_YAML_VALUES", "UNFREEZE_MODES",
    "BackboneSpec", "ClassifierSpec", "DataSpec", "DenseSpec", "EarlyStoppingSpec", "ExtractSpec", "FinetuneSpec",
    "HeadSpec", "ImagSpec", "OptimizerSpec", "Parameter", "Recipe", "ScheduleSpec", "TuneSpec", "UnfreezeSpec",
    "WarmupSpec", "check_arguments", "did_you_mean", "import_object", "load_recipe", "parse_duration", "parse_space",
    "recipe_splits", "with_values",
]
