"""What `transferkit tune` searches: each strategy's default space around the recipe, the recipe's own
``tune.space`` on top, checked before the search starts (:func:`check_tune`), and sampled per trial.

The defaults are centred on the recipe, so its own values are always one point of the space (the
first trial runs the recipe as it is):

- extract: the cut point (the recipe's layer, its neighbours among the backbone's named block ends, and top),
  the classifier (logistic regression, linear SVM; C is chosen by the classifier's cross-validated
  grid inside every trial), flip averaging and power normalisation;
- finetune and imag: the unfreezing depth, both learning rates (a fifth to five times the recipe's),
  weight decay, label smoothing, MixUp, CutMix, the epochs, LP-FT on or off, and the input size.

A key applies to the strategies whose sections it is in (``extract.*`` to extract; ``head.*``,
``warmup.*``, ``finetune.*`` to finetune and imag; ``imag.*`` to imag; the rest to all), so a
search over ``strategy`` samples only the keys of the strategy a trial runs.
"""

from __future__ import annotations

import dataclasses
import math

from transferkit.errors import RecipeError, ResourceError, TransferkitError
from transferkit.models.registry import get_backbone_info
from transferkit.recipe import Parameter, Recipe, load_recipe, parse_space, with_values
from transferkit.recipe.search import label

SECTIONS = {"extract": ("extract",), "finetune": ("head", "warmup", "finetune"),
            "imag": ("head", "warmup", "finetune", "imag")}


def applies(parameter: Parameter, strategy: str) -> bool:
    """Whether trials of ``strategy`` sample ``parameter``: its ``strategies``, else those whose sections hold its key."""
    if parameter.strategies:
        return strategy in parameter.strategies
    section = parameter.key.split(".")[0]
    owners = [name for name, sections in SECTIONS.items() if section in sections]
    return not owners or strategy in owners


def check_tune(recipe: Recipe) -> dict:
    """Check the search before it runs: every strategy searched, and every searched value of a key
    the strategies check beyond the schema (layer names, classifier and optimizer names), as
    `check_recipe` checks a recipe. Returns the search space.

    Raises:
        RecipeError: one line naming ``tune.space.<key>`` and the value.
    """
    from transferkit.strategies import check_recipe

    space = search_space(recipe)
    for strategy in strategies_of(space, recipe):
        check_recipe(dataclasses.replace(recipe, strategy=strategy), weights=False)
    plain = recipe.to_dict()
    for key, parameter in space.items():
        if key == "strategy":
            continue
        strategy = next((s for s in strategies_of(space, recipe) if applies(parameter, s)), None)
        if strategy is None:
            raise RecipeError(f"no trial would use it: the search runs {' and '.join(strategies_of(space, recipe))}; "
                              f"search strategy as well, or leave the key out", key=f"tune.space.{key}")
        for value in parameter.values():
            try:
                check_recipe(load_recipe(with_values(plain, {key: value, "strategy": strategy})), weights=False)
            except ResourceError:
                raise
            except TransferkitError as error:  # a layer the backbone lacks, an unknown optimizer, ...
                raise RecipeError(f"the value {value!r} does not fit the recipe: {error}",
                                  key=f"tune.space.{key}") from None
    return space


def search_space(recipe: Recipe) -> dict[str, Parameter]:
    """The space a tuning of ``recipe`` searches: ``strategy`` first when it is searched, then the default
    space of every strategy searched (unless ``tune.defaults`` is false), then ``tune.space``,
    whose entries replace the defaults' for the same key."""
    given = parse_space(recipe.tune.space)
    strategies = strategies_of(given, recipe)
    space = {"strategy": given["strategy"]} if "strategy" in given else {}
    if recipe.tune.defaults:
        for strategy in strategies:
            for key, parameter in default_space(recipe, strategy).items():
                if key in space:  # finetune's and imag's: one parameter that both sample
                    parameter = dataclasses.replace(parameter, strategies=space[key].strategies + (strategy,))
                space[key] = parameter
    space.update({key: parameter for key, parameter in given.items() if key != "strategy"})
    return space


def strategies_of(space: dict[str, Parameter], recipe: Recipe) -> list[str]:
    """The strategies a search runs: the recipe's first, then the other searched ones."""
    searched = list(space["strategy"].choices) if "strategy" in space else []
    return list(dict.fromkeys([recipe.strategy, *searched] if recipe.strategy in searched or not searched
                              else searched))


def default_space(recipe: Recipe, strategy: str) -> dict[str, Parameter]:
    """The default search space of ``strategy`` around ``recipe``'s values (see the module docstring)."""
    space = _extract_space(recipe) if strategy == "extract" else _finetune_space(recipe)
    return {key: dataclasses.replace(parameter, strategies=(strategy,)) for key, parameter in space.items()}


def _extract_space(recipe: Recipe) -> dict[str, Parameter]:
    from transferkit.features.classifiers import CLASSIFIERS

    spec = recipe.extract
    space = {}
    if isinstance(spec.layer, str):
        space["extract.layer"] = _choices("extract.layer", spec.layer, *_neighbour_layers(recipe, spec.layer))
    if spec.classifier.name in CLASSIFIERS and spec.classifier.name in ("logistic_regression", "linear_svm"):
        space["extract.classifier.name"] = _choices("extract.classifier.name", spec.classifier.name,
                                                    "logistic_regression", "linear_svm")
    space["extract.tta"] = _choices("extract.tta", spec.tta, not spec.tta)
    space["extract.power_norm"] = _choices("extract.power_norm", spec.power_norm, not spec.power_norm)
    return space


def _neighbour_layers(recipe: Recipe, layer: str) -> list[str]:
    """Two named cut points shallower than ``layer``, one deeper, and ``top`` (the pooled output) always."""
    points = [*get_backbone_info(recipe.backbone.name).cut_points[:-1], "top"]  # the last one is top, unpooled
    index = points.index(layer) if layer in points else len(points) - 1
    return [*points[max(0, index - 2):index + 2], "top"]


def _finetune_space(recipe: Recipe) -> dict[str, Parameter]:
    info, warmup, spec = get_backbone_info(recipe.backbone.name), recipe.warmup, recipe.finetune
    unfreeze = _unfreeze_as_chosen(recipe.to_dict()["finetune"]["unfreeze"])
    batchnorm = {"train_batchnorm": spec.unfreeze.train_batchnorm}
    space = {"finetune.unfreeze": _choices("finetune.unfreeze", unfreeze, {"from": info.finetune_from, **batchnorm},
                                           {"fraction": 0.5, **batchnorm}, {"all": True, **batchnorm}),
             "finetune.optimizer.learning_rate": _around("finetune.optimizer.learning_rate",
                                                         spec.optimizer.learning_rate, 5)}
    if warmup.epochs and not warmup.linear_probe:
        space["warmup.optimizer.learning_rate"] = _around("warmup.optimizer.learning_rate",
                                                          warmup.optimizer.learning_rate, 5)
    if spec.optimizer.weight_decay:
        space["finetune.optimizer.weight_decay"] = _around("finetune.optimizer.weight_decay",
                                                           spec.optimizer.weight_decay, 10)
    space["finetune.label_smoothing"] = Parameter("finetune.label_smoothing", low=0.0,
                                                  high=max(0.2, spec.label_smoothing))
    space["finetune.mixup"] = _choices("finetune.mixup", spec.mixup, 0.0, 0.2)
    space["finetune.cutmix"] = _choices("finetune.cutmix", spec.cutmix, 0.0, 1.0)
    if spec.epochs >= 2:
        space["finetune.epochs"] = Parameter("finetune.epochs", low=max(1, spec.epochs // 2),
                                             high=spec.epochs + spec.epochs // 2)
    if not recipe.head.layers and not recipe.head.custom and recipe.head.pooling != "flatten":
        space["warmup.linear_probe"] = _choices("warmup.linear_probe", warmup.linear_probe, not warmup.linear_probe)
    size = recipe.data.image_size or info.default_size  # null: the backbone's default
    smaller = max(info.min_size, int(round(size * 5 / 7 / 32)) * 32)
    space["data.image_size"] = _choices("data.image_size", recipe.data.image_size, smaller)
    return space


def _choices(key: str, current, *others) -> Parameter:
    """Choices: ``current`` first, then ``others``, without repeats."""
    values = []
    for value in (current, *others):
        if value not in values:
            values.append(value)
    return Parameter(key, choices=tuple(values))


def _around(key: str, value: float, factor: float) -> Parameter:
    """A log range from ``value / factor`` to ``value * factor``."""
    return Parameter(key, low=value / factor, high=value * factor, log=True)


def suggest(trial, space: dict[str, Parameter], default_strategy: str) -> dict:
    """Sample a trial's values from ``space`` (Optuna's define-by-run: ``strategy`` first, then only
    the keys that apply to it). Returns ``{recipe key: value}``."""
    values = {}
    strategy = default_strategy
    if "strategy" in space:
        strategy = values["strategy"] = _suggest(trial, space["strategy"])
    for key, parameter in space.items():
        if key != "strategy" and applies(parameter, strategy):
            values[key] = _suggest(trial, parameter)
    return values


def _suggest(trial, parameter: Parameter):
    if parameter.choices is not None:
        if _scalar(parameter):
            return trial.suggest_categorical(parameter.key, list(parameter.choices))
        labels = {label(choice): choice for choice in parameter.choices}
        return labels[trial.suggest_categorical(parameter.key, list(labels))]
    if parameter.integer:
        return trial.suggest_int(parameter.key, parameter.low, parameter.high, step=parameter.step or 1,
                                 log=parameter.log)
    return trial.suggest_float(parameter.key, parameter.low, parameter.high, step=parameter.step, log=parameter.log)


def centre(recipe: Recipe, space: dict[str, Parameter], strategy: str) -> dict:
    """The Optuna parameters that reproduce ``recipe`` run as ``strategy`` (for the keys whose current
    value is in the space; the others are left to the sampler)."""
    plain = recipe.to_dict()
    params = {"strategy": strategy} if "strategy" in space else {}
    for key, parameter in space.items():
        if key == "strategy" or not applies(parameter, strategy):
            continue
        value = _value_at(plain, key)
        if parameter.choices is not None and value in parameter.choices:
            params[key] = value if _scalar(parameter) else label(value)
        elif parameter.choices is None and parameter.contains(value) and _on_step(parameter, value):
            params[key] = value
    return params


def _scalar(parameter: Parameter) -> bool:
    """Whether Optuna can hold the choices as they are (else they go by their YAML text)."""
    return all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in parameter.choices)


def _on_step(parameter: Parameter, value) -> bool:
    if not parameter.step:
        return True
    steps = (value - parameter.low) / parameter.step
    return math.isclose(steps, round(steps), abs_tol=1e-9)


def _value_at(plain: dict, key: str):
    node = plain
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if key == "finetune.unfreeze" and isinstance(node, dict):
        return _unfreeze_as_chosen(node)
    return node


def _unfreeze_as_chosen(unfreeze: dict) -> dict:
    """A plain ``finetune.unfreeze`` as the default space's choices write it: the mode set, and train_batchnorm."""
    return {key: value for key, value in unfreeze.items() if value not in (None, False) or key == "train_batchnorm"}
