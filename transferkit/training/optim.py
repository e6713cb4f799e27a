"""Optimizers, layer-wise learning rates and learning-rate schedules from recipe specs.

* :func:`build_optimizer`: any ``keras.optimizers`` class by name, optionally with a
  learning-rate factor per variable (discriminative / layer-wise learning rates).
* :func:`layer_decay_multipliers`: those factors for layer-wise learning-rate decay.
* :func:`build_schedule`: warm-up then constant, step, exponential, cosine, SGDR or a
  Keras-style ``lr(epoch, lr)`` function, as one serialisable :class:`EpochSchedule`.

Everything is written with ``keras`` and ``keras.ops`` only and runs on the TensorFlow, JAX and
torch backends. A schedule is a pure function of the optimizer's ``iterations`` counter, so it
stays right across a checkpoint and resume.

Import this module before ``keras.saving.load_model(...)`` on a model compiled with a
layer-wise optimizer or an :class:`EpochSchedule`, so that both are registered.

Example:
    >>> finetune = load_recipe("recipes/flowers5_finetune.yaml").finetune
    >>> schedule = build_schedule(finetune.schedule, finetune.optimizer.learning_rate,
    ...                           epochs=finetune.epochs, steps_per_epoch=50)
    >>> multipliers = layer_decay_multipliers(model, decay=0.8)  # model: any built keras.Model
    >>> optimizer = build_optimizer(finetune.optimizer, schedule, layer_multipliers=multipliers)
    >>> model.compile(optimizer, loss="sparse_categorical_crossentropy")
    >>> learning_rate_at(schedule, 0), learning_rate_at(schedule, 50 * finetune.epochs - 1)
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import keras
from keras import ops

from transferkit.errors import RecipeError, did_you_mean
from transferkit.recipe import MAX_EPOCHS, OptimizerSpec, ScheduleSpec, import_object

SCHEDULES = ("constant", "step", "exponential", "cosine", "sgdr", "function")

# Arguments that have their own recipe key, so they may not appear in optimizer.options.
_OWN_KEYS = ("learning_rate", "momentum", "nesterov", "weight_decay")
# keras.optimizers classes that wrap or combine other optimizers: not buildable from a name.
_WRAPPERS = ("Optimizer", "LossScaleOptimizer", "MultiOptimizer")


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------

def build_optimizer(spec: OptimizerSpec, learning_rate=None, *,
                    layer_multipliers: dict[str, float] | None = None) -> keras.optimizers.Optimizer:
    """Build the ``keras.optimizers`` optimizer that a recipe's ``optimizer:`` section describes.

    Args:
        spec: an :class:`~transferkit.recipe.OptimizerSpec`. ``name`` is any ``keras.optimizers``
            class, matched ignoring case and underscores (``sgd``, ``adam_w``, ``RMSprop``).
        learning_rate: a float or a ``LearningRateSchedule`` that replaces ``spec.learning_rate``.
        layer_multipliers: ``variable.path -> factor``: each variable is updated with the learning
            rate times its factor (1 for variables not listed; 0 freezes one). Decoupled weight
            decay, which Keras scales by the learning rate, is scaled too.

    Returns:
        An instance of the named class (``isinstance(opt, keras.optimizers.SGD)`` holds); with
        ``layer_multipliers``, of a subclass that applies them.

    Raises:
        RecipeError: unknown name, momentum or nesterov for a class that takes none, an unknown
            or duplicated entry in ``options``, or arguments the class rejects.
    """
    optimizer_class = _optimizer_class(spec.name)
    kwargs = _optimizer_kwargs(spec, optimizer_class)
    kwargs["learning_rate"] = spec.learning_rate if learning_rate is None else learning_rate
    if isinstance(kwargs["learning_rate"], numbers.Real):
        kwargs["learning_rate"] = float(kwargs["learning_rate"])  # Keras insists on a float
    if layer_multipliers:
        optimizer_class = _layerwise_class(optimizer_class)
        kwargs["layer_multipliers"] = _checked_multipliers(layer_multipliers)
    try:
        return optimizer_class(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"optimizer: {spec.name}: {' '.join(str(err).split())}") from None


def check_optimizer(spec: OptimizerSpec, key: str) -> None:
    """Checks an ``optimizer:`` section without training: the class exists and takes its arguments.

    Builds the optimizer (cheap: Keras creates its variables only on the first step) and drops it.

    Args:
        spec: the section.
        key: its recipe key, e.g. ``"finetune.optimizer"``, for error messages.

    Raises:
        RecipeError: as :func:`build_optimizer`, the message starting with ``key``.
    """
    try:
        build_optimizer(spec)
    except RecipeError as error:
        raise RecipeError(f"{key}{str(error).removeprefix('optimizer')}") from None


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
        raise RecipeError(f"optimizer.name: unknown optimizer {name!r}: {hint}"
                          f"give any keras.optimizers class: {', '.join(classes)}")
    return classes[_normalise(name)]


def _arguments(optimizer_class: type) -> list[str]:
    """The named constructor arguments of an optimizer class (``self`` and ``**kwargs`` left out)."""
    parameters = inspect.signature(optimizer_class.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD]


def _optimizer_kwargs(spec, optimizer_class: type) -> dict:
    """Constructor arguments from the spec, checked against what the class takes."""
    arguments = _arguments(optimizer_class)
    name = _normalise(spec.name)
    kwargs = {}
    for key, value, given in (("momentum", spec.momentum, spec.momentum is not None),
                              ("nesterov", spec.nesterov, spec.nesterov)):
        if key in arguments:
            if value is not None:
                kwargs[key] = value
        elif given:
            takers = [n for n, c in _optimizer_classes().items() if key in _arguments(c)]
            raise RecipeError(f"optimizer.{key}: {name} takes no {key} (got {value!r}): remove "
                              f"optimizer.{key}, or use an optimizer that takes it: {', '.join(takers)}")
    if spec.weight_decay is not None:
        kwargs["weight_decay"] = spec.weight_decay
    for key, value in spec.options.items():
        if key in _OWN_KEYS:
            raise RecipeError(f"optimizer.options.{key}: {key} has its own key: set optimizer.{key} instead")
        if key not in arguments:
            hint = did_you_mean(key, arguments)
            hint = f"{hint} " if hint else ""
            raise RecipeError(f"optimizer.options.{key}: unknown argument for {name} (got {value!r}): "
                              f"{hint}(arguments: {', '.join(a for a in arguments if a not in _OWN_KEYS)})")
        kwargs[key] = value
    return kwargs


def _checked_multipliers(layer_multipliers: dict) -> dict[str, float]:
    checked = {}
    for path, factor in layer_multipliers.items():
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 <= factor < math.inf:
            raise ValueError(f"layer_multipliers[{path!r}]: expected a finite number >= 0, got {factor!r}")
        checked[str(path)] = float(factor)
    return checked


@functools.cache
def _layerwise_class(optimizer_class: type) -> type:
    """A subclass of ``optimizer_class`` that scales the learning rate per variable.

    Keras applies an update in ``_backend_update_step(grads, variables, learning_rate)``: a loop
    over ``update_step`` in the base class and on JAX, a ``tf.distribute`` merge call on
    TensorFlow, and fused ``torch._foreach_*`` kernels on torch (``_parallel_update_step``, one
    learning rate for all variables). The subclass splits the variables into groups of equal
    factor and hands each group to the original method with ``learning_rate * factor``, so every
    backend keeps its own update path, fused kernels included. ``_apply_weight_decay`` is split
    the same way.

    The subclass derives from the class that the public one really instantiates on this backend
    (on torch, ``keras.optimizers.SGD(...)`` builds a fused torch SGD): ``__new__`` says which
    without running ``__init__``. It is registered for ``keras.saving`` as
    ``transferkit>Layerwise<Name>``.
    """
    concrete = type(optimizer_class.__new__(optimizer_class))

    def __init__(self, *args, layer_multipliers=None, **kwargs):
        super(layerwise, self).__init__(*args, **kwargs)
        self._layer_multipliers = dict(layer_multipliers or {})
        self._variable_factors = ()

    def build(self, variables):
        super(layerwise, self).build(variables)
        self._variable_factors = tuple(self._layer_multipliers.get(v.path, 1.0) for v in variables)

    def _factor_groups(self, variables, grads=None):
        """``{factor: (variables, grads)}``: the variables (and their gradients, if given) by factor."""
        groups = {}
        for variable, grad in zip(variables, [None] * len(variables) if grads is None else grads):
            group_variables, group_grads = groups.setdefault(
                self._variable_factors[self._get_variable_index(variable)], ([], []))
            group_variables.append(variable)
            group_grads.append(grad)
        return groups

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        for factor, (variables, group_grads) in self._factor_groups(trainable_variables, grads).items():
            rate = learning_rate if factor == 1.0 else ops.multiply(learning_rate, factor)
            super(layerwise, self)._backend_update_step(group_grads, variables, rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        weight_decay = self.weight_decay
        try:  # each backend's own decay computes variable * self.weight_decay * learning rate
            for factor, (group, _) in self._factor_groups(variables).items():
                if factor:
                    self.weight_decay = weight_decay * factor
                    super(layerwise, self)._apply_weight_decay(group)
        finally:
            self.weight_decay = weight_decay

    def get_config(self):
        return {**super(layerwise, self).get_config(), "layer_multipliers": dict(self._layer_multipliers)}

    layerwise = type(f"Layerwise{optimizer_class.__name__}", (concrete,), {
        "__init__": __init__, "build": build, "_factor_groups": _factor_groups,
        "_backend_update_step": _backend_update_step, "_apply_weight_decay": _apply_weight_decay,
        "get_config": get_config, "__module__": __name__,
        "__doc__": f"keras.optimizers.{optimizer_class.__name__} with a learning-rate factor per variable.",
    })
    return keras.saving.register_keras_serializable(package="transferkit")(layerwise)


# Register every layer-wise class now, so that keras.saving can load a compiled model that uses one
# in a process that has only imported this module.
for _optimizer in _optimizer_classes().values():
    _layerwise_class(_optimizer)


def layer_decay_multipliers(model: keras.Model, decay: float, trainable_only: bool = True) -> dict[str, float]:
    """Layer-wise learning-rate decay: smaller learning rates for earlier layers.

    The layers of ``model.layers`` (nested models flattened into their own layers, in order) that
    hold weights are numbered from the top: the last gets ``k = 0``, the one before ``k = 1``,
    and so on. Every weight of layer ``k`` gets the factor ``decay ** k``. A layer is one depth
    step whatever it holds (a BatchNormalization layer counts like a Dense one).

    Args:
        model: a built Keras model.
        decay: the factor per layer, in (0, 1] (``finetune.layer_decay``).
        trainable_only: count and map only trainable weights. False counts frozen layers too, so
            the factors do not change when more of the body is unfrozen later.

    Returns:
        ``variable.path -> factor``, for :func:`build_optimizer`'s ``layer_multipliers``.
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay <= 1:
        raise RecipeError(f"finetune.layer_decay: expected a number in (0, 1], got {decay!r}: "
                          f"e.g. 0.75 (each earlier layer learns 0.75 times as fast)")
    weighted = [layer for layer in _flat_layers(model)
                if (layer.trainable_weights if trainable_only else layer.weights)]
    factors = {}
    for k, layer in enumerate(reversed(weighted)):
        for variable in (layer.trainable_weights if trainable_only else layer.weights):
            factors.setdefault(variable.path, decay ** k)  # a shared variable keeps its top factor
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


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="transferkit")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate per optimizer step, defined over (fractional) epochs.

    With ``W = warmup_epochs * steps_per_epoch`` warm-up steps, step ``s < W`` gets
    ``learning_rate * (s + 1) / W`` (a linear ramp that reaches the full rate at its last step).
    After it, ``t`` counts the (fractional) epochs since warm-up ended, ``T = epochs -
    warmup_epochs`` (at least 1) and the rate is, by ``kind``:

    * ``constant``: ``learning_rate``;
    * ``step``: ``learning_rate * gamma ** floor(t / step_epochs)``;
    * ``exponential``: ``learning_rate * gamma ** t``;
    * ``cosine``: from ``learning_rate`` at ``t = 0`` to ``min_learning_rate`` at ``t = T``, then flat;
    * ``sgdr``: the same cosine over cycles of ``restart_epochs``, ``restart_epochs *
      restart_mult``, ... epochs, restarting at the full rate; flat at the minimum after the
      last cycle that starts before ``T``;
    * ``function``: ``table[epoch]``, the absolute epoch (warm-up included) clamped to the table.

    After warm-up the rate never goes below ``min_learning_rate``. Every kind but ``function`` is a
    closed form of the step (SGDR's cycle too), so nothing grows with the number of epochs;
    ``function``'s table has one rate per epoch, at most :data:`~transferkit.recipe.MAX_EPOCHS`.

    Args:
        kind: one of :data:`SCHEDULES`.
        learning_rate: the base rate.
        epochs: the planned epochs, warm-up included.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs, min_learning_rate, step_epochs, gamma, restart_epochs, restart_mult:
            as in :class:`~transferkit.recipe.ScheduleSpec`.
        table: ``function`` only: the rate of each epoch.
    """

    def __init__(self, kind, learning_rate, epochs, steps_per_epoch, *, warmup_epochs=0,
                 min_learning_rate=0.0, step_epochs=3, gamma=0.1, restart_epochs=2, restart_mult=2.0,
                 table=None):
        if kind not in SCHEDULES:
            raise ValueError(f"EpochSchedule kind must be one of {SCHEDULES}, got {kind!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"EpochSchedule steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        if (kind == "function") != bool(table):
            raise ValueError("EpochSchedule needs a non-empty table for kind 'function', and only then")
        if not 0 <= epochs <= MAX_EPOCHS or not 0 <= warmup_epochs <= MAX_EPOCHS:
            raise ValueError(f"EpochSchedule epochs and warmup_epochs must be in 0..{MAX_EPOCHS}, "
                             f"got {epochs!r} and {warmup_epochs!r}")
        if not restart_epochs > 0 or not restart_mult >= 1:
            raise ValueError(f"EpochSchedule needs restart_epochs > 0 and restart_mult >= 1, "
                             f"got {restart_epochs!r} and {restart_mult!r}")
        self.kind = kind
        self.learning_rate = float(learning_rate)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)
        self.min_learning_rate = float(min_learning_rate)
        self.step_epochs = int(step_epochs)
        self.gamma = float(gamma)
        self.restart_epochs = float(restart_epochs)
        self.restart_mult = float(restart_mult)
        self.table = [float(rate) for rate in table] if table else None
        self.decay_epochs = max(self.epochs - self.warmup_epochs, 1)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        epoch = step / self.steps_per_epoch
        since_warmup = ops.maximum(epoch - self.warmup_epochs, 0.0)
        rate = ops.maximum(self._after_warmup(epoch, since_warmup), self.min_learning_rate)
        if self.warmup_epochs:
            warmup_steps = float(self.warmup_epochs * self.steps_per_epoch)
            rate = ops.where(step < warmup_steps, self.learning_rate * (step + 1.0) / warmup_steps, rate)
        return rate

    def _after_warmup(self, epoch, t):
        """The rate by kind, at absolute epoch ``epoch`` and ``t`` epochs after warm-up."""
        if self.kind == "constant":
            return ops.full_like(t, self.learning_rate)
        if self.kind == "step":
            return self.learning_rate * ops.power(self.gamma, ops.floor(t / self.step_epochs))
        if self.kind == "exponential":
            return self.learning_rate * ops.power(self.gamma, t)
        if self.kind == "cosine":
            return self._cosine(t / self.decay_epochs)
        if self.kind == "sgdr":
            cycle = ops.minimum(self._cycle_of(t), float(self._last_cycle()))
            start = self._cycle_start(cycle)
            return self._cosine((t - start) / (self.restart_epochs * ops.power(self.restart_mult, cycle)))
        last = len(self.table) - 1
        index = ops.clip(ops.cast(ops.floor(epoch), "int32"), 0, last)
        return ops.take(ops.convert_to_tensor(self.table, "float32"), index)

    def _cosine(self, progress):
        """``learning_rate`` at progress 0 down to ``min_learning_rate`` at 1 and beyond."""
        progress = ops.clip(progress, 0.0, 1.0)
        span = self.learning_rate - self.min_learning_rate
        return self.min_learning_rate + span * 0.5 * (1.0 + ops.cos(math.pi * progress))

    def _cycle_start(self, cycle):
        """Where SGDR cycle ``cycle`` (0, 1, ...) starts, in epochs after warm-up (a float or a tensor).

        Cycle ``k`` is ``restart_epochs * restart_mult ** k`` long, so it starts at the geometric sum
        ``restart_epochs * (restart_mult ** k - 1) / (restart_mult - 1)`` (``restart_epochs * k``
        when the cycles do not grow).
        """
        if self.restart_mult == 1.0:
            return self.restart_epochs * cycle
        growth = self.restart_mult ** cycle if isinstance(cycle, float) else ops.power(self.restart_mult, cycle)
        return self.restart_epochs * (growth - 1.0) / (self.restart_mult - 1.0)

    def _cycle_of(self, t):
        """The SGDR cycle holding ``t`` epochs after warm-up (a float tensor), inverting `_cycle_start`.

        The closed form is corrected by one cycle either way where rounding put ``t`` next to a
        boundary, so a restart happens exactly at its step.
        """
        if self.restart_mult == 1.0:
            cycle = ops.floor(t / self.restart_epochs)
        else:
            cycle = ops.floor(ops.log(1.0 + t * (self.restart_mult - 1.0) / self.restart_epochs)
                              / math.log(self.restart_mult))
        cycle = cycle + ops.cast(t >= self._cycle_start(cycle + 1.0), "float32")
        return ops.maximum(cycle - ops.cast(t < self._cycle_start(cycle), "float32"), 0.0)

    def _last_cycle(self) -> int:
        """The cycle holding the end of the schedule (``decay_epochs``): after it the rate stays flat."""
        if self.restart_mult == 1.0:
            cycle = math.floor(self.decay_epochs / self.restart_epochs)
        else:
            cycle = math.floor(math.log1p(self.decay_epochs * (self.restart_mult - 1.0) / self.restart_epochs)
                               / math.log(self.restart_mult))
        while cycle > 0 and self._cycle_start(float(cycle)) >= self.decay_epochs:
            cycle -= 1  # a cycle starting at the very end does not count
        while self._cycle_start(float(cycle + 1)) < self.decay_epochs:
            cycle += 1
        return cycle

    def get_config(self):
        return {"kind": self.kind, "learning_rate": self.learning_rate, "epochs": self.epochs,
                "steps_per_epoch": self.steps_per_epoch, "warmup_epochs": self.warmup_epochs,
                "min_learning_rate": self.min_learning_rate, "step_epochs": self.step_epochs,
                "gamma": self.gamma, "restart_epochs": self.restart_epochs,
                "restart_mult": self.restart_mult, "table": self.table}


def build_schedule(spec: ScheduleSpec, base_lr: float, epochs: int, steps_per_epoch: int) -> EpochSchedule:
    """Build the schedule that a recipe's ``finetune.schedule`` section describes.

    Args:
        spec: a :class:`~transferkit.recipe.ScheduleSpec`.
        base_lr: the rate after warm-up (usually ``optimizer.learning_rate``).
        epochs: the planned epochs, warm-up included.
        steps_per_epoch: optimizer steps (batches) per epoch.

    Returns:
        An :class:`EpochSchedule` to pass as the optimizer's learning rate.

    Raises:
        RecipeError: for ``function``: a missing or unimportable import path, or a function that
            returns something other than a non-negative number.
    """
    table = _function_table(spec.function, base_lr, epochs) if spec.name == "function" else None
    return EpochSchedule(spec.name, base_lr, epochs, steps_per_epoch, warmup_epochs=spec.warmup_epochs,
                         min_learning_rate=spec.min_learning_rate, step_epochs=spec.step_epochs,
                         gamma=spec.gamma, restart_epochs=spec.restart_epochs,
                         restart_mult=spec.restart_mult, table=table)


def check_schedule(spec: ScheduleSpec, base_lr: float, epochs: int) -> None:
    """Checks a schedule without training; for ``function``, imports it and computes its rates.

    The rates of a ``function`` schedule depend on nothing but the epoch and the previous rate, so
    every one of them is known before training: a function that fails or returns something other
    than a learning rate at epoch 5 is reported now, not after five epochs.

    Raises:
        RecipeError: as :func:`build_schedule`.
    """
    build_schedule(spec, base_lr, epochs, steps_per_epoch=1)


_FUNCTION_PROTOCOL = "a function fn(epoch, lr) -> lr"


def _function_table(path, base_lr: float, epochs: int) -> list[float]:
    """The rate of each epoch from a Keras-style ``fn(epoch, lr) -> lr``, threaded from ``base_lr``."""
    key = "finetune.schedule.function"
    if not path:
        raise RecipeError(f"{key}: expected an import path pkg.mod:fn of fn(epoch, lr) -> lr, got {path!r}")
    if not 0 <= epochs <= MAX_EPOCHS:
        raise RecipeError(f"finetune.epochs: expected a whole number >= 0 and <= {MAX_EPOCHS}, got {epochs!r}")
    function = import_object(path, key, _FUNCTION_PROTOCOL, arguments=2)
    table, rate = [], float(base_lr)
    for epoch in range(max(epochs, 1)):
        result = function(epoch, rate)
        if isinstance(result, bool) or not isinstance(result, numbers.Real) or not 0 <= result < math.inf:
            raise RecipeError(f"{key}: {path} returned {result!r} for epoch {epoch}: it must return "
                              f"the learning rate, a finite number >= 0")
        rate = float(result)
        table.append(rate)
    return table


def learning_rate_at(schedule, step: int) -> float:
    """The rate a schedule gives at an optimizer step, as a Python float (for logs and tests).

    Args:
        schedule: a ``LearningRateSchedule`` (or any callable of the step).
        step: the optimizer step (its ``iterations``).

    Returns:
        The learning rate.
    """
    return float(ops.convert_to_numpy(schedule(ops.convert_to_tensor(step, "int32"))))
