"""Measure a run's training curves and judge them: the numbers, and the verdict they give.

Plain numpy: no Keras, no TensorFlow. :func:`transferkit.training.diagnose.diagnose` picks the
judged epochs and words the evidence; :mod:`transferkit.training.remedies` says what to change.

The rules, tried in this order on the judged epochs:

0. **diverged** (judged on every epoch but imag ones): a loss became infinite, or exceeded
   :data:`DIVERGED_LOSS` (cross-entropy stays below about 16, as Keras clips probabilities at 1e-7:
   a larger loss means weights blowing up), or the train loss ended :data:`DIVERGED_RISE` times
   its lowest value and above where it started. The cure is a lower learning rate, not more of it.
1. **too short to tell**: fewer than :data:`MIN_EPOCHS` epochs with any loss or accuracy value.
2. **over-fitting**, either of:

   * val loss ends more than :data:`VAL_LOSS_RISE` (relative) above its minimum, and train loss
     has not risen since that minimum (a rise in both is instability, not over-fitting);
   * final train accuracy exceeds final val accuracy by more than :data:`ACCURACY_GAP`.
     MixUp/CutMix, dropout and label smoothing lower the *train* accuracy, so with them a small
     or negative gap proves little; the val-loss rule still catches those runs.
3. **unstable**: val loss ends more than :data:`VAL_LOSS_RISE` above its minimum and train loss
   has risen since that minimum too: the training itself went wrong (too high a learning rate, or
   the last imag episode's shake-up not yet recovered from), not the fit.
4. **under-fitting**, either of:

   * final train accuracy below :data:`LOW_ACCURACY`, and val accuracy (when logged) too: both
     low, and close, since a wide gap was judged over-fitting above;
   * still learning when it stopped: train loss still falls steeply at the end (its
     least-squares slope over the last :data:`TREND_EPOCHS` epochs drops more than
     :data:`STEEP_LOSS_DROP` of its level *and* more than :data:`MIN_STEEP_DROP` loss units per
     epoch; the floor keeps a near-zero loss that still halves each epoch from counting), and val
     loss, when logged, falls too (by more than :data:`FLAT_CHANGE` per epoch): more epochs would
     still pay. Train loss falling fast beside a flat val loss is not under-fitting.
5. **good fit**: anything else. Without val metrics this only says that training itself went well:
   the evidence says so, and over-fitting cannot be seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_EPOCHS = 2            # fewer judged epochs than this: too short to tell
TREND_EPOCHS = 3          # slopes are fitted over the last this many epochs with a value
ACCURACY_GAP = 0.08       # train minus val accuracy above this: over-fitting
VAL_LOSS_RISE = 0.10      # val loss this fraction above its minimum at the end: over-fitting
LOW_ACCURACY = 0.80       # train (and val) accuracy below this: under-fitting
STEEP_LOSS_DROP = 0.10    # train loss falling by more than this fraction of its level per epoch ...
MIN_STEEP_DROP = 0.02     # ... and by more than this much per epoch: still falling steeply
FLAT_CHANGE = 0.01        # a loss changing less than this fraction per epoch is flat
WELL_BEFORE_END = 2       # the best val loss this many epochs or more before the end is "well before"
DIVERGED_LOSS = 100.0     # a loss above this (cross-entropy stays below ~16): diverged
DIVERGED_RISE = 10.0      # train loss ending this many times its lowest, and above its start: diverged

IMAG = "imag"             # phase label of epochs trained on permuted labels: always ignored
ACCURACY_KEYS = ("accuracy", "top1", "acc", "categorical_accuracy", "sparse_categorical_accuracy")
TOO_SHORT, OVER, UNDER, GOOD = "too short to tell", "over-fitting", "under-fitting", "good fit"
UNSTABLE, DIVERGED = "unstable", "diverged"
VERDICTS = (UNDER, OVER, UNSTABLE, DIVERGED, GOOD, TOO_SHORT)


@dataclass
class Curves:
    """The judged epochs' values, NaN where unknown (a metric never logged is all NaN)."""
    epochs: np.ndarray        # 1-based epoch numbers
    train_loss: np.ndarray
    val_loss: np.ndarray
    train_acc: np.ndarray
    val_acc: np.ndarray

    def usable(self) -> np.ndarray:
        """Per epoch: whether any loss or accuracy value is known."""
        stacked = np.stack([self.train_loss, self.val_loss, self.train_acc, self.val_acc])
        return np.isfinite(stacked).any(axis=0)


def read_curves(history: dict) -> Curves:
    """The four curves of the whole run, each padded with NaN to the longest metric."""
    series = {key: np.array([np.nan if v is None else v for v in values], dtype=float)
              for key, values in history.items()}
    acc_key = next((k for k in ACCURACY_KEYS if k in series or f"val_{k}" in series), ACCURACY_KEYS[0])
    wanted = ["loss", "val_loss", acc_key, f"val_{acc_key}"]
    if not any(key in series for key in wanted):
        raise ValueError(f"history has no loss or accuracy keys to judge (it has {sorted(history)})")
    n_epochs = max(len(series[key]) for key in wanted if key in series)

    def padded(key):
        values = series.get(key, np.array([]))
        return np.concatenate([values, np.full(n_epochs - len(values), np.nan)])

    return Curves(np.arange(1, n_epochs + 1), *(padded(key) for key in wanted))


def select(curves: Curves, indices: np.ndarray) -> Curves:
    """The curves at the given 0-based epochs only."""
    return Curves(*(values[indices] for values in vars(curves).values()))


def divergence(curves: Curves, phases) -> tuple[str, int]:
    """A sentence saying how the training diverged, and the 0-based epoch, or ``("", -1)``."""
    kept = np.array([i for i, label in enumerate(phases or ["?"] * len(curves.epochs)) if label != IMAG], dtype=int)
    for name, values in (("train", curves.train_loss[kept]), ("val", curves.val_loss[kept])):
        if np.isinf(values).any():
            at = kept[int(np.argmax(np.isinf(values)))]
            return f"The {name} loss became infinite in epoch {at + 1}: training diverged.", int(at)
        if np.isfinite(values).any() and np.nanmax(values) > DIVERGED_LOSS:
            at = kept[int(np.nanargmax(values))]
            return (f"The {name} loss reached {np.nanmax(values):.3g} in epoch {at + 1} (cross-entropy alone stays "
                    f"below about 16, so the weights are blowing up): training diverged."), int(at)
    train = curves.train_loss[kept]
    known = np.flatnonzero(np.isfinite(train))
    if known.size >= 2:
        first, final, lowest = train[known[0]], train[known[-1]], float(np.min(train[known]))
        if final >= DIVERGED_RISE * lowest and final > first:
            return (f"The train loss ended at {final:.3g}, {final / lowest:.0f}x its lowest ({lowest:.3g}) and above "
                    f"where it started ({first:.3g}): training diverged."), int(kept[known[-1]])
    return "", -1


def last(values: np.ndarray) -> float | None:
    """The last finite value, or None."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else None


def _trend(values: np.ndarray) -> tuple[float | None, float | None]:
    """Least-squares slope per epoch over the last TREND_EPOCHS known values, and slope / their mean."""
    positions = np.flatnonzero(np.isfinite(values))[-TREND_EPOCHS:]
    if len(positions) < 2:
        return None, None
    slope = float(np.polyfit(positions, values[positions], 1)[0])
    level = float(np.abs(values[positions]).mean())
    return slope, (slope / level if level > 0 else 0.0)


def measure(curves: Curves) -> dict:
    """The numbers the rules and the evidence use, by name; None where unknown."""
    train_acc, val_acc = last(curves.train_acc), last(curves.val_acc)
    train_slope, train_change = _trend(curves.train_loss)
    val_slope, val_change = _trend(curves.val_loss)
    m = {"epochs_judged": int(curves.usable().sum()),
         "train_accuracy": train_acc, "val_accuracy": val_acc,
         "accuracy_gap": None if train_acc is None or val_acc is None else train_acc - val_acc,
         "train_loss": last(curves.train_loss), "val_loss": last(curves.val_loss),
         "train_loss_slope": train_slope, "train_loss_change": train_change,
         "val_loss_slope": val_slope, "val_loss_change": val_change,
         "val_loss_best": None, "val_loss_best_epoch": None, "epochs_since_best": None,
         "val_loss_rise": None, "train_loss_at_best": None}
    known = np.flatnonzero(np.isfinite(curves.val_loss))
    if known.size:
        best = int(known[np.argmin(curves.val_loss[known])])
        best_loss = float(curves.val_loss[best])
        m.update(val_loss_best=best_loss, val_loss_best_epoch=int(curves.epochs[best]),
                 epochs_since_best=int(known[-1] - best),
                 val_loss_rise=(m["val_loss"] - best_loss) / best_loss if best_loss > 0 else 0.0,
                 train_loss_at_best=last(curves.train_loss[:best + 1]))
    return m


def overfit_by_val_loss(m: dict) -> bool:
    """Val loss ended VAL_LOSS_RISE above its minimum while train loss did not rise."""
    if m["val_loss_rise"] is None or m["val_loss_rise"] <= VAL_LOSS_RISE:
        return False
    return None in (m["train_loss"], m["train_loss_at_best"]) or m["train_loss"] <= m["train_loss_at_best"]


def unstable(m: dict) -> bool:
    """Val loss ended VAL_LOSS_RISE above its minimum and train loss rose since then too."""
    return m["val_loss_rise"] is not None and m["val_loss_rise"] > VAL_LOSS_RISE \
        and None not in (m["train_loss"], m["train_loss_at_best"]) and m["train_loss"] > m["train_loss_at_best"]


def _overfit_by_gap(m: dict) -> bool:
    return m["accuracy_gap"] is not None and m["accuracy_gap"] > ACCURACY_GAP


def _underfit_by_accuracy(m: dict) -> bool:
    """Train accuracy below LOW_ACCURACY, and val accuracy too when logged."""
    return m["train_accuracy"] is not None and m["train_accuracy"] < LOW_ACCURACY \
        and (m["val_accuracy"] is None or m["val_accuracy"] < LOW_ACCURACY)


def train_loss_steep(m: dict) -> bool:
    """Train loss still falls by STEEP_LOSS_DROP of its level and MIN_STEEP_DROP per epoch."""
    return m["train_loss_slope"] is not None and m["train_loss_change"] < -STEEP_LOSS_DROP \
        and m["train_loss_slope"] < -MIN_STEEP_DROP


def still_learning(m: dict) -> bool:
    """Train loss falls steeply at the end, and val loss (when logged) is falling too."""
    val_falling = m["val_loss_change"] is None or m["val_loss_change"] < -FLAT_CHANGE
    return train_loss_steep(m) and val_falling


def verdict_of(m: dict) -> str:
    """The verdict the measures give (all but "diverged", which :func:`divergence` tells)."""
    if m["epochs_judged"] < MIN_EPOCHS:
        return TOO_SHORT
    if overfit_by_val_loss(m) or _overfit_by_gap(m):
        return OVER
    if unstable(m):
        return UNSTABLE
    if _underfit_by_accuracy(m) or still_learning(m):
        return UNDER
    return GOOD
