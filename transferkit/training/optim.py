"""Optimizers by name, and layer-wise learning rates.

* :func:`build_optimizer`: any ``keras.optimizers`` class by name, optionally with a
  learning-rate factor per variable (discriminative / layer-wise learning rates).
* :func:`check_optimizer`: the same, to find a bad optimizer before training.
* :func:`layer_decay_multipliers`: those factors for layer-wise learning-rate decay.

Learning-rate schedules are in :mod:`transferkit.training.schedules`. Everything is written with
``keras`` and ``keras.ops`` on Keras' public API only, and runs on the TensorFlow, JAX and torch
backends.

Import this module before ``keras.saving.load_model(...)`` on a model compiled with a
layer-wise optimizer, so that its class is registered (as ``transferkit>Layerwise<Name>``).

Example:
    >>> schedule = build_schedule("cosine", 1e-3, epochs=10, steps_per_epoch=50)  # training.schedules
    >>> multipliers = layer_decay_multipliers(model, layer_decay=0.8)  # model: any built keras.Model
    >>> optimizer = build_optimizer("adamw", schedule, weight_decay=1e-4, layer_multipliers=multipliers)
    >>> model.compile(optimizer, loss="sparse_categorical_crossentropy")
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import keras
from keras import ops

from transferkit.errors import RecipeError, did_you_mean

# Arguments that have their own recipe key, so they may not appear in options.
_OWN_KEYS = ("learning_rate", "momentum", "nesterov", "weight_decay")
# keras.optimizers classes that wrap or combine other optimizers: not buildable from a name.
_WRAPPERS = ("Optimizer", "LossScaleOptimizer", "MultiOptimizer")


def build_optimizer(name: str, learning_rate, *, momentum: float | None = None, nesterov: bool = False,
                    weight_decay: float | None = None, options: dict | None = None,
                    layer_multipliers: dict[str, float] | None = None) -> keras.optimizers.Optimizer:
    """Build a ``keras.optimizers`` optimizer by name.

    Args:
        name: any ``keras.optimizers`` class, matched ignoring case and underscores (``sgd``,
            ``adam_w``, ``RMSprop``).
        learning_rate: a float or a ``LearningRateSchedule``.
        momentum, nesterov, weight_decay: for the classes that take them (None, False: not given).
        options: other constructor arguments (``clipnorm``, ``beta_1``, ...).
        layer_multipliers: ``variable.path -> factor``: each variable is updated with the learning
            rate times its factor (1 for variables not listed; 0 freezes one). Decoupled weight
            decay, which Keras scales by the learning rate, is scaled too.

    Returns:
        An instance of the named class (``isinstance(opt, keras.optimizers.SGD)`` holds); with
        ``layer_multipliers``, of its :class:`LayerwiseLearningRates` subclass.

    Raises:
        RecipeError: its key relative to these arguments (``name``, ``momentum``,
            ``options.clipnorm``, none for arguments the class rejects): an unknown name, momentum
            or nesterov for a class that takes none, an unknown or duplicated entry in ``options``.
        ValueError: a factor that is not a finite number >= 0.
    """
    optimizer_class = _optimizer_class(name)
    kwargs = _optimizer_kwargs(name, optimizer_class, momentum, nesterov, weight_decay, options or {})
    kwargs["learning_rate"] = float(learning_rate) if isinstance(learning_rate, numbers.Real) else learning_rate
    if layer_multipliers:
        optimizer_class = _layerwise_class(optimizer_class)
        kwargs["layer_multipliers"] = _checked_multipliers(layer_multipliers)
    try:
        return optimizer_class(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{name}: {' '.join(str(err).split())}") from None


def check_optimizer(name: str, learning_rate, **fields) -> None:
    """Checks an optimizer without training: the class exists and takes its arguments.

    Builds the optimizer (cheap: Keras creates its variables only on the first step) and drops it.

    Args:
        name, learning_rate, fields: as :func:`build_optimizer` takes them.

    Raises:
        RecipeError: as :func:`build_optimizer`.
    """
    build_optimizer(name, learning_rate, **fields)


def _normalise(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


@functools.cache
def _optimizer_classes() -> dict[str, type]:
    """Normalised name -> public ``keras.optimizers`` class, for every class buildable by name."""
    classes = {}
    for attribute in dir(keras.optimizers):
        candidate = getattr(keras.optimizers, attribute)
        if (isinstance(candidate, type) and issubclass(candidate, keras.optimizers.Optimizer)
                and attribute not in _WRAPPERS):
            classes[_normalise(attribute)] = candidate
    return classes


def _optimizer_class(name: str) -> type:
    classes = _optimizer_classes()
    if not isinstance(name, str) or _normalise(name) not in classes:
        hint = did_you_mean(_normalise(str(name)), classes)
        hint = f"{hint} " if hint else ""
        raise RecipeError(f"unknown optimizer {name!r}: {hint}give any keras.optimizers class: "
                          f"{', '.join(classes)}", key="name")
    return classes[_normalise(name)]


def _arguments(optimizer_class: type) -> list[str]:
    """The named constructor arguments of an optimizer class (``self`` and ``**kwargs`` left out)."""
    parameters = inspect.signature(optimizer_class.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD]


def _optimizer_kwargs(name: str, optimizer_class: type, momentum, nesterov, weight_decay, options: dict) -> dict:
    """Constructor arguments other than the learning rate, checked against what the class takes."""
    arguments = _arguments(optimizer_class)
    shown = _normalise(name)
    kwargs = {}
    for key, value, given in (("momentum", momentum, momentum is not None), ("nesterov", nesterov, nesterov)):
        if key in arguments:
            if value is not None:
                kwargs[key] = value
        elif given:
            takers = [n for n, c in _optimizer_classes().items() if key in _arguments(c)]
            raise RecipeError(f"{shown} takes no {key} (got {value!r}): remove optimizer.{key}, or use an "
                              f"optimizer that takes it: {', '.join(takers)}", key=key)
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    for key, value in options.items():
        if key in _OWN_KEYS:
            raise RecipeError(f"{key} has its own key: set optimizer.{key} instead", key=f"options.{key}")
        if key not in arguments:
            hint = did_you_mean(key, arguments)
            hint = f"{hint} " if hint else ""
            raise RecipeError(f"unknown argument for {shown} (got {value!r}): {hint}(arguments: "
                              f"{', '.join(a for a in arguments if a not in _OWN_KEYS)})", key=f"options.{key}")
        kwargs[key] = value
    return kwargs


def _checked_multipliers(layer_multipliers: dict) -> dict[str, float]:
    checked = {}
    for path, factor in layer_multipliers.items():
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 <= factor < math.inf:
            raise ValueError(f"layer_multipliers[{path!r}]: expected a finite number >= 0, got {factor!r}")
        checked[str(path)] = float(factor)
    return checked


class _FactorGroups:
    """What a layer-wise optimizer was built for: its variables and, per factor above 0, the updater
    of those with that factor. A plain object, so that Keras does not track the model's variables
    as the optimizer's own."""

    def __init__(self, variables, updaters: dict):
        self.variables, self.updaters = list(variables), updaters


class LayerwiseLearningRates:
    """A learning-rate factor per variable for a ``keras.optimizers`` class, on Keras' public API.

    Mixed in before the class (see :func:`build_optimizer`): the optimizer keeps its step counter,
    learning rate (or schedule) and config. ``build`` groups the variables by factor and gives each
    group above 0 an *updater*: an optimizer of the same class whose learning rate is this one's
    times the factor, with its own slots (momenta, EMA), per-gradient clipping and decoupled weight
    decay (scaled by its learning rate, so by the factor) and, on torch, fused kernels. Variables of
    factor 0 get none: they stay as they are. ``apply`` unscales a ``loss_scale_factor`` and clips
    to ``global_clipnorm`` across all groups, then has each updater apply its group's gradients at
    this optimizer's ``iterations``, so bias corrections and schedules see the same step.
    ``gradient_accumulation_steps`` is refused: its ``iterations`` is no variable to follow.
    """

    updater_class: type  # the keras.optimizers class, set by _layerwise_class

    def __init__(self, *args, layer_multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.gradient_accumulation_steps:
            raise ValueError("gradient_accumulation_steps does not work with layer-wise learning rates")
        self.layer_multipliers = dict(layer_multipliers or {})
        self.factor_groups = _FactorGroups([], {})
        # the updaters' arguments, read now: get_config reads a learning-rate variable, which a compiled
        # train step that builds the optimizer cannot do
        self.updater_config = {**super().get_config(), "global_clipnorm": None, "loss_scale_factor": None}

    def factor_of(self, variable) -> float:
        return self.layer_multipliers.get(variable.path, 1.0)

    def build(self, variables):
        groups = {}
        for variable in variables:
            groups.setdefault(self.factor_of(variable), []).append(variable)
        updaters = {}
        for index, (factor, group) in enumerate(groups.items()):
            if factor:
                updaters[factor] = self.updater_class(**{**self.updater_config, "name": f"{self.name}_group{index}",
                                                         "learning_rate": self.scaled_learning_rate(factor)})
                updaters[factor].build(group)
        self.factor_groups = _FactorGroups(variables, updaters)
        self.built = True

    def scaled_learning_rate(self, factor: float):
        """The learning rate of the updater of ``factor``: this optimizer's at its current step, times it."""
        return lambda: ops.multiply(self.learning_rate, factor)

    @property
    def variables(self):
        """Its own (step counter, learning rate) and the updaters' slots; not their step counters, which
        ``apply`` sets from its own."""
        return [*super().variables, *(v for updater in self.factor_groups.updaters.values()
                                      for v in updater.variables if v is not updater.iterations)]

    def apply(self, grads, trainable_variables=None):
        if not len(grads):
            return
        variables = list(self.factor_groups.variables if trainable_variables is None else trainable_variables)
        if not self.built:
            self.build(variables)
        pairs = [(grad, variable) for grad, variable in zip(grads, variables) if grad is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable.")
        if self.loss_scale_factor is not None:  # as Keras does: a variable overwritten with its gradient gets it as is
            pairs = [(grad if variable.overwrite_with_gradient else grad / self.loss_scale_factor, variable)
                     for grad, variable in pairs]
        if self.global_clipnorm:
            pairs = self.clipped_to_global_norm(pairs)
        by_factor = {}
        for grad, variable in pairs:
            by_factor.setdefault(self.factor_of(variable), []).append((grad, variable))
        for factor, group in by_factor.items():
            if factor:
                updater = self.factor_groups.updaters[factor]
                updater.iterations.assign(self.iterations)
                updater.apply(*zip(*group))
        self.iterations.assign_add(1)

    def clipped_to_global_norm(self, pairs):
        """``(gradient, variable)`` pairs scaled so that their global norm is at most ``global_clipnorm``,
        as Keras does it (a variable overwritten with its gradient neither counts nor is scaled)."""
        counted = [grad for grad, variable in pairs if not variable.overwrite_with_gradient]
        norm = ops.sqrt(ops.sum(ops.stack([ops.sum(ops.square(grad)) for grad in counted])))
        scale = self.global_clipnorm * ops.minimum(1.0 / norm, 1.0 / self.global_clipnorm) + (norm - norm)
        return [(grad if variable.overwrite_with_gradient else grad * scale, variable) for grad, variable in pairs]

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        variables, own = self.factor_groups.variables, self.variables
        mapping = [*zip(variables, trainable_variables), *zip(own, optimizer_variables)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.apply(grads, variables)
        return [scope.get_current_value(v) for v in variables], [scope.get_current_value(v) for v in own]

    def finalize_variable_values(self, var_list):
        for factor, updater in self.factor_groups.updaters.items():
            updater.finalize_variable_values([v for v in var_list if self.factor_of(v) == factor])

    def get_config(self):
        return {**super().get_config(), "layer_multipliers": dict(self.layer_multipliers)}


@functools.cache
def _layerwise_class(optimizer_class: type) -> type:
    """``Layerwise<Name>``: ``optimizer_class`` with :class:`LayerwiseLearningRates`, registered for
    ``keras.saving`` as ``transferkit>Layerwise<Name>``."""
    layerwise = type(f"Layerwise{optimizer_class.__name__}", (LayerwiseLearningRates, optimizer_class), {
        "updater_class": optimizer_class, "__module__": __name__,
        "__doc__": f"keras.optimizers.{optimizer_class.__name__} with a learning-rate factor per variable.",
    })
    return keras.saving.register_keras_serializable(package="transferkit")(layerwise)


# Register every layer-wise class now, so that keras.saving can load a compiled model that uses one
# in a process that has only imported this module.
for _optimizer in _optimizer_classes().values():
    _layerwise_class(_optimizer)


def layer_decay_multipliers(model: keras.Model, layer_decay: float, trainable_only: bool = True) -> dict[str, float]:
    """Layer-wise learning-rate decay: smaller learning rates for earlier layers.

    The layers of ``model.layers`` (nested models flattened into their own layers, in order) that
    hold weights are numbered from the top: the last gets ``k = 0``, the one before ``k = 1``,
    and so on. Every weight of layer ``k`` gets the factor ``layer_decay ** k``. A layer is one
    depth step whatever it holds (a BatchNormalization layer counts like a Dense one).

    Args:
        model: a built Keras model.
        layer_decay: the factor per layer, in (0, 1].
        trainable_only: count and map only trainable weights. False counts frozen layers too, so
            the factors do not change when more of the body is unfrozen later.

    Returns:
        ``variable.path -> factor``, for :func:`build_optimizer`'s ``layer_multipliers``.

    Raises:
        RecipeError: (key ``layer_decay``) a decay outside (0, 1].
    """
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, numbers.Real) or not 0 < layer_decay <= 1:
        raise RecipeError(f"expected a number in (0, 1], got {layer_decay!r}: e.g. 0.75 (each earlier layer "
                          f"learns 0.75 times as fast)", key="layer_decay")
    weighted = [layer for layer in _flat_layers(model)
                if (layer.trainable_weights if trainable_only else layer.weights)]
    factors = {}
    for k, layer in enumerate(reversed(weighted)):
        for variable in (layer.trainable_weights if trainable_only else layer.weights):
            factors.setdefault(variable.path, layer_decay ** k)  # a shared variable keeps its top factor
    return factors


def _flat_layers(model):
    """The layers of ``model`` in order, nested models replaced by their own layers; each once."""
    seen = set()

    def walk(layers):
        for layer in layers:
            if isinstance(layer, keras.Model):
                yield from walk(layer.layers)
            elif id(layer) not in seen:
                seen.add(id(layer))
                yield layer

    return list(walk(model.layers))
