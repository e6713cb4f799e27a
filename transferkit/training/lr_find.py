"""The learning-rate range test (fastai's ``lr_find``): a short sweep that raises the learning rate
exponentially, one batch per step, and records the loss of each step.

* :func:`check_sweep`: the sweep's arguments, checked before any slow work.
* :func:`sweep_schedule`: the schedule of the sweep, as :func:`~transferkit.training.schedules.build_schedule`
  takes it: an ``exponential`` schedule over ``steps`` "epochs" of one step each.
* :class:`SweepRecorder`: the Keras callback that records each step's rate and loss, smooths the
  loss and stops the sweep when it diverges.
* :func:`run_sweep`: the sweep on a compiled model, which gets its weights back afterwards.
* :func:`suggest_rates`: fastai's ``valley`` and ``steepest`` suggestions from the curve, and
  ``rise``, for the flat curve of a model whose head is already trained.

Each step is one Keras epoch of one batch (``fit(..., epochs=steps, steps_per_epoch=1)``), so the
loss Keras logs at the end of an epoch is that one batch's loss on every backend. Everything is
written with ``keras`` and numpy only and runs on the TensorFlow, JAX and torch backends.

Example:
    >>> model.compile(optimizer=keras.optimizers.SGD(build_schedule(**sweep_schedule(1e-7, 10, 100),
    ...               learning_rate=1e-7, epochs=100, steps_per_epoch=1)), loss="categorical_crossentropy")
    >>> sweep = run_sweep(model, batches, steps=100)
    >>> suggest_rates(sweep.learning_rates, sweep.losses, planned_steps=100)["valley"]["learning_rate"]
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field

import keras
import numpy as np

from transferkit.errors import TransferkitError

log = logging.getLogger("transferkit")

BETA = 0.98        # fastai's smoothing of the loss (an exponential moving average, bias-corrected)
DIVERGENCE = 4.0   # the sweep stops where the smoothed loss passes this many times its minimum
SKIP_END = 5       # fastai leaves the last steps (and the first tenth) out of its suggestions
MAX_STEPS = 10_000
RISE = 0.10        # ``rise``: where the smoothed loss first climbs this far (10%) above its lowest point so far,
RISE_MARGIN = 3.0  # divided by this margin (half a decade): fine-tuning holds a rate for many batches, the sweep one
SUGGESTIONS = ("valley", "steepest", "rise")


def check_sweep(start: float, end: float, steps: int, suggest: str = "auto") -> None:
    """Checks a sweep's arguments. Raises :class:`TransferkitError` (one line) on a bad one."""
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise TransferkitError(f"lr-find: {name} must be a learning rate > 0, got {value!r}: "
                                   "e.g. --start 1e-7 --end 10")
    if not start < end:
        raise TransferkitError(f"lr-find: start ({start:g}) must be below end ({end:g}): the sweep raises the "
                               "learning rate, e.g. --start 1e-7 --end 10")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 10 <= steps <= MAX_STEPS:
        raise TransferkitError(f"lr-find: steps must be a whole number from 10 to {MAX_STEPS}, got {steps!r}: "
                               "e.g. --steps 100")
    if suggest not in ("auto", *SUGGESTIONS):
        raise TransferkitError(f"lr-find: suggest must be one of auto, {', '.join(SUGGESTIONS)}, got {suggest!r}")


def sweep_schedule(start: float, end: float, steps: int) -> dict:
    """The sweep's schedule: ``name`` and fields of ``build_schedule``, which, built from the
    learning rate ``start`` over ``epochs=steps`` with ``steps_per_epoch=1``, gives step ``i`` the
    rate ``start * (end / start) ** (i / (steps - 1))``: from ``start`` at the first step to ``end``
    at the last."""
    return {"name": "exponential", "gamma": (end / start) ** (1.0 / (steps - 1))}


def smooth(losses, beta: float = BETA) -> np.ndarray:
    """fastai's smoothed loss: the exponential moving average of ``losses``, bias-corrected."""
    average, smoothed = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = beta * average + (1.0 - beta) * float(loss)
        smoothed.append(average / (1.0 - beta ** count))
    return np.array(smoothed, dtype=float)


@dataclass
class Sweep:
    """What a sweep recorded, one entry per step taken: the learning rate, the batch's loss and the smoothed loss."""
    learning_rates: list[float] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    stopped: str | None = None  # why the sweep ended early; None: it took every step


class SweepRecorder(keras.callbacks.Callback):
    """Records each step of a sweep (one Keras epoch of one batch) into ``sweep``: the optimizer's
    learning rate at the step, the batch's loss and the smoothed loss (:func:`smooth`). Stops the
    sweep when the smoothed loss is not finite or passes ``DIVERGENCE`` times its minimum (fastai's
    rule). With ``progress``, logs one line every tenth of the ``steps``."""

    def __init__(self, sweep: Sweep, steps: int, progress: bool = True, beta: float = BETA):
        super().__init__()
        self.sweep, self.steps, self.progress, self.beta = sweep, steps, progress, beta
        self.average, self.best, self.rate = 0.0, math.inf, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        self.average = self.beta * self.average + (1.0 - self.beta) * loss
        smoothed = self.average / (1.0 - self.beta ** (epoch + 1))
        sweep = self.sweep
        sweep.learning_rates.append(self.rate)
        sweep.raw_losses.append(loss)
        sweep.losses.append(smoothed)
        self.best = min(self.best, smoothed)
        if not math.isfinite(smoothed):
            sweep.stopped = f"the loss became {loss} at learning rate {self.rate:.2e}"
        elif smoothed > DIVERGENCE * self.best:
            sweep.stopped = (f"the smoothed loss {smoothed:.3g} passed {DIVERGENCE:g}x its minimum "
                             f"{self.best:.3g} at learning rate {self.rate:.2e}")
        if sweep.stopped:
            self.model.stop_training = True
        if self.progress and ((epoch + 1) % max(self.steps // 10, 1) == 0 or sweep.stopped):
            log.info("lr-find: step %d/%d  lr %.2e  loss %.4f  smoothed %.4f", epoch + 1, self.steps, self.rate,
                     loss, smoothed)


def run_sweep(model, batches, steps: int, progress: bool = True) -> Sweep:
    """Trains the compiled ``model`` for up to ``steps`` batches of ``batches`` (at least that many),
    one step per Keras epoch, recording the sweep; ``model`` gets back the weights it had before.

    The model's optimizer sets each step's learning rate (a schedule such as :func:`sweep_schedule`'s).

    Returns:
        The :class:`Sweep`, one entry per step taken.
    """
    sweep = Sweep()
    weights = model.get_weights()
    try:
        model.fit(batches, epochs=steps, steps_per_epoch=1, callbacks=[SweepRecorder(sweep, steps, progress)],
                  verbose=0, shuffle=False)
    finally:
        model.set_weights(weights)
    if sweep.stopped:
        log.info("lr-find: stopped after %d of %d steps: %s", len(sweep.losses), steps, sweep.stopped)
    return sweep


def suggest_rates(learning_rates, losses, planned_steps: int) -> dict[str, dict]:
    """fastai's suggestions from a sweep's smoothed losses, left out the first tenth of the
    ``planned_steps`` and the last :data:`SKIP_END` steps taken (and anything from the first
    loss that is not finite on):

    * ``valley``: the longest valley of the curve (its longest decreasing run of points, not
      necessarily neighbours), and the point half-way down it (its start + a third + a sixth);
    * ``steepest``: the rate where the loss falls fastest per log step of the rate;
    * ``rise``: the rate :data:`RISE_MARGIN` times below the one where the loss starts to climb
      (:func:`rise_index`). After a linear probe or warm-up the head is trained already and the curve
      is flat, within its noise, until the rate gets too high; the valley then lands in the noise.

    Returns:
        ``{"valley": {"learning_rate", "loss", "step"}, "steepest": {...}, "rise": {...}}``, ``step``
        counted from 1.

    Raises:
        TransferkitError: fewer than 2 steps are left to suggest from (the loss diverged at once).
    """
    first = planned_steps // 10
    rates = np.asarray(learning_rates, dtype=float)[first:max(len(learning_rates) - SKIP_END, first)]
    curve = np.asarray(losses, dtype=float)[first:first + len(rates)]
    bad = np.flatnonzero(~np.isfinite(curve))
    rates, curve = (rates[:bad[0]], curve[:bad[0]]) if bad.size else (rates, curve)
    if len(curve) < 2:
        raise TransferkitError(f"lr-find: the loss diverged after {len(losses)} of {planned_steps} steps, too few "
                               "to suggest a rate from: lower the end of the sweep (--end), or sweep more steps")
    picks = {"valley": valley_index(curve), "steepest": steepest_index(rates, curve), "rise": rise_index(rates, curve)}
    return {name: {"learning_rate": float(rates[i]), "loss": float(curve[i]), "step": first + i + 1}
            for name, i in picks.items()}


def valley_index(losses) -> int:
    """fastai's ``valley``: the index half-way down the longest valley of ``losses``."""
    losses = np.asarray(losses, dtype=float)
    longest = np.ones(len(losses), dtype=int)  # the longest decreasing run of points ending at each
    for i in range(1, len(losses)):
        before = longest[:i][losses[:i] > losses[i]]
        if before.size:
            longest[i] = before.max() + 1
    end = int(np.argmax(longest))
    start = end - int(longest[end])
    third = (end - start) / 3
    return min(max(start + int(third) + int(third / 2), 0), len(losses) - 1)


def steepest_index(learning_rates, losses) -> int:
    """fastai's ``steepest``: the index where the loss falls fastest per log step of the rate."""
    slopes = np.diff(np.asarray(losses, dtype=float)) / np.diff(np.log(np.asarray(learning_rates, dtype=float)))
    return int(np.argmin(slopes))


def rise_index(learning_rates, losses, rise: float = RISE, margin: float = RISE_MARGIN) -> int:
    """``rise``: the last index whose rate is at most ``1 / margin`` of the rate where ``losses``
    first climb ``rise`` (a fraction) above their lowest point so far, the edge past which training
    becomes unstable; where they never do, the edge is the last rate swept."""
    losses, rates = np.asarray(losses, dtype=float), np.asarray(learning_rates, dtype=float)
    risen = np.flatnonzero(losses > (1.0 + rise) * np.minimum.accumulate(losses))
    edge = rates[risen[0]] if risen.size else rates[-1]
    return max(int(np.searchsorted(rates, edge / margin, side="right")) - 1, 0)
