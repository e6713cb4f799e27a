"""What happens around each epoch of fine-tuning, apart from the trainer's own bookkeeping.

- :func:`monitor_class`: the Keras callback that hands each batch and epoch to the
  :class:`~transferkit.training.trainer.Trainer` (reseeding, recording) and stops on a NaN loss
  before that epoch is checkpointed;
- :class:`EarlyStopping`: ``finetune.early_stopping``, with its state a plain dict that is
  checkpointed in ``state.json``, so a resumed run stops where an uninterrupted one does;
- :func:`write_history`: ``history.json``, ``history.csv`` and ``curves.png``, rewritten each epoch.

The trainer calls them in a fixed order within one epoch's end (record, early stopping, checkpoint,
history files), as exact resume needs.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import time
from pathlib import Path

from transferkit.errors import RecipeError
from transferkit.io import atomic_write_json, atomic_write_text

log = logging.getLogger("transferkit")


@functools.cache
def monitor_class():
    """The Keras callback class ``Monitor(trainer, phase)`` (built on first use: Keras loads late)."""
    import keras

    class Monitor(keras.callbacks.Callback):
        """Hands each finished epoch to the trainer; stops on a NaN loss before it is checkpointed."""

        def __init__(self, trainer, phase):
            super().__init__()
            self.trainer, self.phase = trainer, phase
            self.diverged, self.diverged_loss, self._started = False, None, 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.trainer.begin_epoch(self.model, epoch)
            self._started = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            self.trainer.begin_batch(batch)

        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get("loss", math.nan))
            if not math.isfinite(loss):
                self.diverged, self.diverged_loss = True, loss
                self.model.stop_training = True
                return
            self.trainer.end_epoch(self.phase, logs, time.perf_counter() - self._started)

    return Monitor


class EarlyStopping:
    """``finetune.early_stopping`` (``spec``, None: off) over ``state``, the dict that is checkpointed:
    ``best``, ``best_epoch``, ``wait`` and, once patience runs out, ``stopped``."""

    def __init__(self, spec, state: dict):
        self.spec, self.state = spec, state

    @property
    def stopped(self) -> bool:
        return bool(self.state.get("stopped"))

    def improved(self, logs: dict, epoch: int) -> bool:
        """Records epoch ``epoch``'s logs: True when it is the best so far (its weights are to be kept);
        otherwise counts it against the patience, and sets ``stopped`` when that runs out."""
        spec = self.spec
        if spec.monitor not in logs:
            raise RecipeError(f"finetune.early_stopping.monitor: {spec.monitor!r} is not logged; give one of "
                              f"{', '.join(sorted(k for k in logs if k != 'learning_rate'))}")
        value, state = logs[spec.monitor], self.state
        sign = 1 if "loss" in spec.monitor else -1  # losses fall, accuracies rise
        if "best" not in state or sign * (value - state["best"]) < -spec.min_delta:
            state.update(best=value, best_epoch=epoch, wait=0)
            return True
        state["wait"] += 1
        if state["wait"] >= spec.patience:
            state["stopped"] = True
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                     spec.monitor, state["wait"], state["best"], state["best_epoch"])
        return False


def write_history(folder: Path, history: dict[str, list], phases: list[str], title: str) -> None:
    """``history.json``, ``history.csv`` (one row per epoch) and ``curves.png`` in ``folder``."""
    from transferkit.reports.evaluate import plot_history

    atomic_write_json(folder / "history.json", {**history, "phase": phases})
    keys = sorted(history)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["epoch", "phase", *keys])
    for i, phase in enumerate(phases):
        writer.writerow([i + 1, phase, *("" if history[k][i] is None else history[k][i] for k in keys)])
    atomic_write_text(folder / "history.csv", text.getvalue())
    curves = {k: v for k, v in history.items() if k not in ("learning_rate", "seconds")}
    plot_history(curves, folder / "curves.png", phases=phases, title=title)
