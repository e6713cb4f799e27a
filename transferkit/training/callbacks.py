"""The Keras callbacks of fine-tuning, one per concern. The
:class:`~transferkit.training.trainer.Trainer` composes them for each phase, in this order:

- :class:`Reseed`: seeds each epoch's (and batch's) random draws from the seed and the epoch alone;
- :class:`NanGuard`: stops on a loss that is not finite, before the epoch is recorded or checkpointed;
- :class:`RecordEpoch`: adds the epoch's logs to the trainer's record (the run's history);
- :class:`EarlyStopping`: its state a plain dict, checkpointed in ``state.json``, so that a resumed
  run stops where an uninterrupted one does;
- :class:`ReduceOnPlateau`: lowers a ``plateau`` schedule's rate, its state checkpointed the same way;
- :class:`SaveCheckpoint`: the epoch's weights, optimizer state and record, into ``checkpoint/``;
- :class:`WriteHistory`: ``history.json``, ``history.csv`` and ``curves.png``, rewritten each epoch;
- :class:`LogEpoch`: the one-line summary of the epoch.

Keras calls a list of callbacks in its order, so that order is the order of their effects at the end
of an epoch, which exact resume relies on. ``record`` is the trainer's
:class:`~transferkit.training.trainer.TrainingRecord`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path

import keras

from transferkit.data.seeds import MODEL, reseed, reseed_backend, seed_states
from transferkit.errors import RecipeError
from transferkit.io import atomic_write_json, atomic_write_text
from transferkit.training.trainer import LossDiverged, TrainingError

log = logging.getLogger("transferkit")


class Reseed(keras.callbacks.Callback):
    """Seeds the random layers of the model being fitted (dropout, augmentation in the model) from
    ``seed`` and the epoch, and the backend's global generator from ``seed``, the epoch and the batch,
    so that a resumed run draws what an uninterrupted one draws: what draws from the global generator
    (PyTorch's dropout without a seed) then does not depend on what drew before, such as a data
    loader started only because the run resumed."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed, self.epoch = seed, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        reseed(seed_states(self.model), self.seed, MODEL, epoch)

    def on_train_batch_begin(self, batch, logs=None):
        reseed_backend(self.seed, self.epoch, batch)


class NanGuard(keras.callbacks.Callback):
    """Ends ``fit`` with :class:`LossDiverged` when an epoch's loss is not finite, before the
    callbacks after it record or checkpoint that epoch: the last good epoch stays resumable."""

    def on_epoch_end(self, epoch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        if not math.isfinite(loss):
            raise LossDiverged(loss)


class RecordEpoch(keras.callbacks.Callback):
    """Times each epoch and adds it to ``record`` as a ``phase`` epoch: Keras' logs (passed through
    ``relabel`` when given), the ``learning_rate`` of ``optimizer`` and the ``seconds`` it took."""

    def __init__(self, record, phase: str, optimizer, relabel=None):
        super().__init__()
        self.record, self.phase, self.optimizer, self.relabel = record, phase, optimizer, relabel
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        logs = {key: float(value) for key, value in (logs or {}).items()}
        if self.relabel is not None:
            logs = self.relabel(logs)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        logs["seconds"] = round(seconds, 3)
        self.record.add(self.phase, logs, seconds)


class EarlyStopping(keras.callbacks.Callback):
    """Stops ``fit`` once ``monitor`` (in the epoch's logs in ``record``) has not improved by more
    than ``min_delta`` for ``patience`` epochs; ``keep_best()`` saves the weights of each new best epoch.

    Its state is ``state``, the dict that is checkpointed: ``best``, ``best_epoch``, ``wait`` and, once
    the patience runs out, ``stopped``.
    """

    def __init__(self, record, state: dict, *, monitor: str, min_delta: float, patience: int, keep_best):
        super().__init__()
        self.record, self.state, self.keep_best = record, state, keep_best
        self.monitor, self.min_delta, self.patience = monitor, min_delta, patience

    def on_epoch_end(self, epoch, logs=None):
        if not self.improved(self.record.last, epoch + 1) and self.state.get("stopped"):
            self.model.stop_training = True

    def improved(self, logs: dict, epoch: int) -> bool:
        """Judges epoch ``epoch`` by ``logs``: True when it is the best so far (its weights are kept);
        otherwise counts it against the patience, and sets ``stopped`` when that runs out."""
        if self.monitor not in logs:
            raise RecipeError(f"{self.monitor!r} is not logged; give one of {logged_metrics(logs)}", key="monitor")
        value, state = logs[self.monitor], self.state
        if improves(self.monitor, value, state.get("best"), self.min_delta):
            state.update(best=value, best_epoch=epoch, wait=0)
            self.keep_best()
            return True
        state["wait"] += 1
        if state["wait"] >= self.patience:
            state["stopped"] = True
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                     self.monitor, state["wait"], state["best"], state["best_epoch"])
        return False


class ReduceOnPlateau(keras.callbacks.Callback):
    """Multiplies the rate of a ``plateau`` schedule by its ``gamma`` once its ``monitor`` (in the epoch's
    logs in ``record``) has not improved by more than ``min_delta`` for ``patience`` epochs, never below
    its ``min_learning_rate``; the ``cooldown`` epochs after a drop are not counted (Keras'
    ``ReduceLROnPlateau`` counts the last of them).

    ``schedule`` is the :class:`~transferkit.training.schedules.EpochSchedule` the optimizer runs on,
    attached to it (its ``scale`` an optimizer variable). Its state is ``state``, the dict that is
    checkpointed: ``scale`` (the factor on the rate), ``best``, ``wait`` and ``cooldown`` (epochs left).
    """

    def __init__(self, record, state: dict, schedule):
        super().__init__()
        self.record, self.state, self.schedule = record, state, schedule

    def on_epoch_end(self, epoch, logs=None):
        schedule, state, logs = self.schedule, self.state, self.record.last
        if schedule.monitor not in logs:  # raised as it is: fit's RecipeErrors are early stopping's
            raise TrainingError(f"schedule.monitor: {schedule.monitor!r} is not logged; give one of "
                                f"{logged_metrics(logs)}")
        state.setdefault("scale", 1.0)
        state.setdefault("wait", 0)
        cooling = state.get("cooldown", 0) > 0  # an epoch of the cooldown: not counted
        if cooling:
            state["cooldown"] -= 1
        value = logs[schedule.monitor]
        if improves(schedule.monitor, value, state.get("best"), schedule.min_delta):
            state.update(best=value, wait=0)
        elif not cooling:
            state["wait"] += 1
            if state["wait"] >= schedule.patience:
                self.drop()

    def drop(self) -> None:
        """Lowers the rate by ``gamma`` (to the floor at most), unless it is at the floor already."""
        schedule, state = self.schedule, self.state
        floor = schedule.min_learning_rate / schedule.learning_rate
        if state["scale"] <= floor:
            return
        scale = max(state["scale"] * schedule.gamma, floor)
        log.info("plateau: %s has not improved for %d epochs (best %.4f): learning rate %.2e -> %.2e",
                 schedule.monitor, state["wait"], state["best"], schedule.learning_rate * state["scale"],
                 schedule.learning_rate * scale)
        schedule.scale.assign(scale)
        state.update(scale=scale, wait=0, cooldown=schedule.cooldown)


def improves(monitor: str, value: float, best: float | None, min_delta: float) -> bool:
    """Whether ``value`` of ``monitor`` beats ``best`` (None: nothing yet) by more than ``min_delta``:
    losses fall, other metrics rise."""
    sign = 1 if "loss" in monitor else -1
    return best is None or sign * (value - best) < -min_delta


def logged_metrics(logs: dict) -> str:
    """The metrics an epoch logged, for an error about one that it did not."""
    return ", ".join(sorted(key for key in logs if key not in ("learning_rate", "seconds")))


class SaveCheckpoint(keras.callbacks.Callback):
    """Checkpoints each epoch into ``checkpoints`` (:class:`~transferkit.training.checkpoints.Checkpoints`):
    the weights of ``model``, the state of ``optimizer`` and ``state()``; with ``head``, also ``head()``
    (an imag episode's own head weights) for each epoch before ``head_until``, the end of the episode,
    which a run resumed inside the episode goes on with."""

    def __init__(self, checkpoints, model, optimizer, state, head=None, head_until: int = 0):
        super().__init__()
        self.checkpoints, self.saved_model, self.optimizer, self.state = checkpoints, model, optimizer, state
        self.head, self.head_until = head, head_until

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        head = self.head() if self.head is not None and done < self.head_until else None
        self.checkpoints.save(self.saved_model, self.optimizer, done, self.state(), imag_head=head)


class WriteHistory(keras.callbacks.Callback):
    """Rewrites ``history.json`` and ``history.csv`` (one row per epoch) in ``folder`` from ``record``
    after each epoch, and ``curves.png`` with ``plot(curves, path, phases=..., title=title)`` when given."""

    def __init__(self, folder: Path, record, title: str, plot=None):
        super().__init__()
        self.folder, self.record, self.title, self.plot = Path(folder), record, title, plot

    def on_epoch_end(self, epoch, logs=None):
        history, phases = self.record.history, self.record.phases
        atomic_write_json(self.folder / "history.json", {**history, "phase": phases})
        keys = sorted(history)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["epoch", "phase", *keys])
        for i, phase in enumerate(phases):
            writer.writerow([i + 1, phase, *("" if history[k][i] is None else history[k][i] for k in keys)])
        atomic_write_text(self.folder / "history.csv", text.getvalue())
        if self.plot is not None:
            curves = {k: v for k, v in history.items() if k not in ("learning_rate", "seconds")}
            self.plot(curves, self.folder / "curves.png", phases=phases, title=self.title)


class LogEpoch(keras.callbacks.Callback):
    """Logs one line per epoch from ``record``: the epoch of ``total``, its phase, the main metrics,
    the learning rate and the time it took."""

    SHOWN = ("loss", "accuracy", "imag_loss", "imag_accuracy", "val_loss", "val_accuracy")

    def __init__(self, record, total: int):
        super().__init__()
        self.record, self.total = record, total

    def on_epoch_end(self, epoch, logs=None):
        record = self.record
        shown = "  ".join(f"{key} {record.last[key]:.4f}" for key in self.SHOWN if key in record.last)
        log.info("epoch %d/%d [%s]  %s  lr %.2e  (%.0fs)", record.epoch, self.total, record.phases[-1], shown,
                 record.last["learning_rate"], record.last_seconds)
