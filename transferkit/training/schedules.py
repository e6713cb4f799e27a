"""Learning-rate schedules over epochs, for the optimizers of :mod:`transferkit.training.optim`.

* :class:`EpochSchedule`: warm-up then constant, step, exponential, cosine, SGDR, one cycle, a rate
  lowered on plateaus or a table of rates per epoch, as one serialisable ``LearningRateSchedule``.
* :func:`build_schedule`: an :class:`EpochSchedule` from a schedule's kind and fields, a
  ``function`` kind's Keras-style ``lr(epoch, lr)`` turned into its table.
* :func:`check_schedule`: the same without steps, to find a bad schedule before training.
* :func:`learning_rate_at`: a schedule's rate at a step, as a float.

Everything is written with ``keras`` and ``keras.ops`` only and runs on the TensorFlow, JAX and
torch backends. A schedule is a pure function of the optimizer's ``iterations`` counter, so it
stays right across a checkpoint and resume; ``plateau``'s rate is that times a scale, a variable of
the optimizer that :class:`~transferkit.training.callbacks.ReduceOnPlateau` lowers and the trainer
checkpoints.

Import this module before ``keras.saving.load_model(...)`` on a model compiled with an
:class:`EpochSchedule`, so that it is registered (as ``transferkit>EpochSchedule``).

Example:
    >>> schedule = build_schedule("cosine", 1e-3, epochs=10, steps_per_epoch=50, warmup_epochs=1)
    >>> learning_rate_at(schedule, 0), learning_rate_at(schedule, 50 * 10 - 1)
"""

from __future__ import annotations

import math
import numbers

import keras
from keras import ops

from transferkit.errors import RecipeError
from transferkit.recipe import MAX_EPOCHS, import_object

SCHEDULES = ("constant", "step", "exponential", "cosine", "sgdr", "one_cycle", "plateau", "function")


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
    * ``one_cycle`` (one-cycle policy): over the ``T * steps_per_epoch`` steps, up from ``learning_rate /
      div_factor`` to ``learning_rate`` until step ``pct_start * steps - 1``, then down to ``learning_rate /
      (div_factor * final_div_factor)`` at the last step, both halves cosine; it warms up by itself, so
      it takes no ``warmup_epochs``. The learning rate cycles, the optimizer's momentum does not;
    * ``plateau``: ``learning_rate * scale`` (the warm-up's ramp too); ``scale`` starts at 1, and once :meth:`attach` has made it
      a variable of the optimizer, :class:`~transferkit.training.callbacks.ReduceOnPlateau` multiplies it
      by ``gamma`` when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs,
      then waits ``cooldown`` epochs before counting again;
    * ``function``: ``table[epoch]``, the absolute epoch (warm-up included) clamped to the table.

    After warm-up the rate never goes below ``min_learning_rate``. Every kind but ``function`` is a
    closed form of the step (SGDR's cycle too), so nothing grows with the number of epochs;
    ``function``'s table has one rate per epoch, at most :data:`~transferkit.recipe.MAX_EPOCHS`.

    Args:
        kind: one of :data:`SCHEDULES`.
        learning_rate: the base rate.
        epochs: the planned epochs, warm-up included.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs: epochs of linear warm-up, counted in ``epochs``.
        min_learning_rate: the floor after warm-up, and where ``cosine`` and ``sgdr`` end.
        step_epochs, gamma: ``step``: epochs between drops and the factor of each; ``exponential``:
            ``gamma`` is the factor per epoch; ``plateau``: the factor of each drop.
        restart_epochs, restart_mult: ``sgdr``: the first cycle's length, and each next one's growth.
        pct_start, div_factor, final_div_factor: ``one_cycle``: the fraction of the steps spent rising,
            the start rate's divisor and the end rate's further divisor.
        monitor, patience, cooldown, min_delta: ``plateau``: what ``ReduceOnPlateau`` watches and how.
        table: ``function`` only: the rate of each epoch.

    Raises:
        RecipeError: (key ``warmup_epochs``) warm-up epochs for ``one_cycle``.
    """

    def __init__(self, kind, learning_rate, epochs, steps_per_epoch, *, warmup_epochs=0,
                 min_learning_rate=0.0, step_epochs=3, gamma=0.1, restart_epochs=2, restart_mult=2.0,
                 pct_start=0.3, div_factor=25.0, final_div_factor=1e4, monitor="val_loss", patience=2,
                 cooldown=0, min_delta=0.0, table=None):
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
        if not 0 < pct_start < 1 or not div_factor >= 1 or not final_div_factor >= 1:
            raise ValueError(f"EpochSchedule needs 0 < pct_start < 1, div_factor >= 1 and final_div_factor >= 1, "
                             f"got {pct_start!r}, {div_factor!r} and {final_div_factor!r}")
        if kind == "one_cycle" and warmup_epochs:
            raise RecipeError(f"one_cycle warms up by itself over its first pct_start of the steps: set "
                              f"warmup_epochs to 0 (got {warmup_epochs!r}), or pct_start", key="warmup_epochs")
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
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.monitor = str(monitor)
        self.patience = int(patience)
        self.cooldown = int(cooldown)
        self.min_delta = float(min_delta)
        self.table = [float(rate) for rate in table] if table else None
        self.decay_epochs = max(self.epochs - self.warmup_epochs, 1)
        self.scale = 1.0  # plateau: the factor on the rate, an optimizer variable once attached

    def __call__(self, step):
        step = ops.cast(step, "float32")
        epoch = step / self.steps_per_epoch
        since_warmup = ops.maximum(epoch - self.warmup_epochs, 0.0)
        rate = ops.maximum(self._after_warmup(epoch, since_warmup), self.min_learning_rate)
        if self.warmup_epochs:
            warmup_steps = float(self.warmup_epochs * self.steps_per_epoch)
            ramp = self.learning_rate * ops.cast(self.scale, "float32") * (step + 1.0) / warmup_steps
            rate = ops.where(step < warmup_steps, ramp, rate)
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
            return cosine_anneal(self.learning_rate, self.min_learning_rate, t / self.decay_epochs)
        if self.kind == "sgdr":
            cycle = ops.minimum(self._cycle_of(t), float(self._last_cycle()))
            start = self._cycle_start(cycle)
            progress = (t - start) / (self.restart_epochs * ops.power(self.restart_mult, cycle))
            return cosine_anneal(self.learning_rate, self.min_learning_rate, progress)
        if self.kind == "one_cycle":
            return self._one_cycle(t * self.steps_per_epoch)
        if self.kind == "plateau":
            return ops.full_like(t, self.learning_rate) * ops.cast(self.scale, "float32")
        last = len(self.table) - 1
        index = ops.clip(ops.cast(ops.floor(epoch), "int32"), 0, last)
        return ops.take(ops.convert_to_tensor(self.table, "float32"), index)

    def _one_cycle(self, step):
        """The one-cycle rate at ``step`` (a float tensor) after the start of the schedule."""
        steps = float(self.decay_epochs * self.steps_per_epoch)
        peak = max(self.pct_start * steps - 1.0, 0.0)  # the step of the full rate
        start = self.learning_rate / self.div_factor
        rising = cosine_anneal(start, self.learning_rate, step / max(peak, 1.0))
        falling = cosine_anneal(self.learning_rate, start / self.final_div_factor,
                                (step - peak) / max(steps - 1.0 - peak, 1.0))
        return ops.where(step < peak, rising, falling)

    def attach(self, optimizer, scale: float = 1.0) -> None:
        """Makes a ``plateau`` schedule's scale a variable of ``optimizer``, starting at ``scale``; other
        kinds have none. As an optimizer variable it is part of every backend's compiled step and of
        the optimizer's checkpoint. Call it before the optimizer is built or restored."""
        if self.kind == "plateau":
            self.scale = optimizer.add_variable((), initializer=keras.initializers.Constant(scale), dtype="float32",
                                                aggregation="only_first_replica", name="plateau_scale")

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
                "restart_mult": self.restart_mult, "pct_start": self.pct_start, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "monitor": self.monitor, "patience": self.patience,
                "cooldown": self.cooldown, "min_delta": self.min_delta, "table": self.table}


def cosine_anneal(start, end, progress):
    """From ``start`` at progress 0 to ``end`` at 1 (and beyond) along half a cosine."""
    progress = ops.clip(progress, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * progress))


def build_schedule(kind: str, learning_rate: float, epochs: int, steps_per_epoch: int, *,
                   function: str | None = None, **shape) -> EpochSchedule:
    """Build an :class:`EpochSchedule`; for ``function``, its table from ``fn(epoch, lr) -> lr``.

    Args:
        kind: one of :data:`SCHEDULES`.
        learning_rate: the rate after warm-up (usually the optimizer's learning rate).
        epochs: the planned epochs, warm-up included.
        steps_per_epoch: optimizer steps (batches) per epoch.
        function: ``function`` only: the import path ``pkg.mod:fn`` of a Keras-style
            ``fn(epoch, lr) -> lr``, threaded from ``learning_rate`` over the epochs.
        shape: ``warmup_epochs``, ``min_learning_rate``, ``step_epochs``, ``gamma``, ``restart_epochs``,
            ``restart_mult``, ``pct_start``, ``div_factor``, ``final_div_factor``, ``monitor``, ``patience``,
            ``cooldown``, ``min_delta``, as :class:`EpochSchedule` takes them.

    Returns:
        An :class:`EpochSchedule` to pass as the optimizer's learning rate.

    Raises:
        RecipeError: for ``function`` (key ``function``): a missing or unimportable import path,
            or a function that returns something other than a non-negative number; ``epochs``
            beyond :data:`~transferkit.recipe.MAX_EPOCHS` (key ``epochs``); warm-up epochs for
            ``one_cycle`` (key ``warmup_epochs``).
    """
    table = _function_table(function, learning_rate, epochs) if kind == "function" else None
    return EpochSchedule(kind, learning_rate, epochs, steps_per_epoch, table=table, **shape)


def check_schedule(kind: str, learning_rate: float, epochs: int, **fields) -> None:
    """Checks a schedule without training; for ``function``, imports it and computes its rates.

    The rates of a ``function`` schedule depend on nothing but the epoch and the previous rate, so
    every one of them is known before training: a function that fails or returns something other
    than a learning rate at epoch 5 is reported now, not after five epochs.

    Args:
        kind, learning_rate, epochs, fields: as :func:`build_schedule` takes them.

    Raises:
        RecipeError: as :func:`build_schedule`.
    """
    build_schedule(kind, learning_rate, epochs, steps_per_epoch=1, **fields)


_FUNCTION_PROTOCOL = "a function fn(epoch, lr) -> lr"


def _function_table(path, learning_rate: float, epochs: int) -> list[float]:
    """The rate of each epoch from a Keras-style ``fn(epoch, lr) -> lr``, threaded from ``learning_rate``."""
    if not path:
        raise RecipeError(f"expected an import path pkg.mod:fn of fn(epoch, lr) -> lr, got {path!r}",
                          key="function")
    if not 0 <= epochs <= MAX_EPOCHS:
        raise RecipeError(f"expected a whole number >= 0 and <= {MAX_EPOCHS}, got {epochs!r}", key="epochs")
    function = import_object(path, "function", _FUNCTION_PROTOCOL, arguments=2)
    table, rate = [], float(learning_rate)
    for epoch in range(max(epochs, 1)):
        result = function(epoch, rate)
        if isinstance(result, bool) or not isinstance(result, numbers.Real) or not 0 <= result < math.inf:
            raise RecipeError(f"{path} returned {result!r} for epoch {epoch}: it must return "
                              f"the learning rate, a finite number >= 0", key="function")
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
