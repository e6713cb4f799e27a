"""Read a run's training curves: under-fitting, over-fitting or a good fit, why, and what to change.

Only the per-epoch history goes in (the Keras-style dict that :func:`transferkit.reports.evaluate.plot_history`
draws), so this module is plain numpy: no Keras, no TensorFlow.

The rules, tried in this order on the judged epochs (see :func:`diagnose` for which those are):

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

Example:
    >>> d = diagnose({"loss": [1.0, 0.5, 0.2, 0.05], "val_loss": [1.0, 0.7, 0.8, 1.1],
    ...               "accuracy": [0.6, 0.8, 0.95, 0.99], "val_accuracy": [0.6, 0.75, 0.76, 0.76]})
    >>> d.verdict
    'over-fitting'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
class Diagnosis:
    """What a run's curves say, the numbers behind it, and what to change.

    Attributes:
        verdict: one of :data:`VERDICTS`.
        evidence: sentences with the numbers the verdict rests on.
        remedies: concrete changes matched to the verdict, naming recipe keys.
        phase: the phase judged (the last one that is not "imag"); None without phases.
        epochs: the judged epochs, 1-based as on the plot's x axis.
        measures: the numbers by name (None where unknown), for JSON consumers.
    """
    verdict: str
    evidence: list[str]
    remedies: list[str]
    phase: str | None = None
    epochs: list[int] = field(default_factory=list)
    measures: dict = field(default_factory=dict)

    def to_text(self, remedies: int = 3) -> str:
        """A short paragraph: the verdict, the evidence, then the first few remedies.

        Args:
            remedies: how many remedies to name (all of them are in :attr:`remedies`).
        Returns:
            e.g. ``"Over-fitting. Judged all 8 epochs. Final accuracy: ... Try: Early stopping: ..."``.
        """
        text = f"{self.verdict.capitalize()}. " + " ".join(self.evidence)
        return text + (" Try: " + " ".join(self.remedies[:remedies]) if self.remedies else "")

    def to_dict(self) -> dict:
        """A JSON-clean dict of every field (no NaN: unknown numbers are None)."""
        return asdict(self)


@dataclass
class _Curves:
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


def diagnose(history: dict[str, list[float]], phases: list[str] | None = None) -> Diagnosis:
    """Judge a training history by the rules in this module's docstring.

    Args:
        history: metric -> one value per epoch, as Keras' ``fit`` returns: ``loss``, ``val_loss``,
            ``accuracy`` (or ``top1``/``acc``), ``val_accuracy``; others are ignored. None and NaN
            values are skipped; missing val keys mean judging the training curves alone.
        phases: optional label per epoch (e.g. "warmup", "finetune", "imag"). The verdict rests on
            the last stretch of the final phase that is not "imag" (the final training regime),
            falling back to the whole run when that has fewer than :data:`MIN_EPOCHS` usable
            epochs; the evidence also sums up the whole run. "imag" epochs are always ignored:
            their train metrics are on permuted labels.
    Returns:
        A :class:`Diagnosis`.
    Raises:
        ValueError: the history has no loss or accuracy key, or phases has the wrong length.
    """
    curves_all = _curves(history)
    n_epochs = len(curves_all.epochs)
    if phases is not None and len(phases) != n_epochs:
        raise ValueError(f"phases has {len(phases)} labels for {n_epochs} epochs: give one per epoch")
    judged, phase, scope = _judged_epochs(phases, curves_all.usable())
    curves = _select(curves_all, judged)
    measures = _measure(curves)
    divergence, diverged_at = _divergence(curves_all, phases)
    measures["learning_rate"] = _last(np.array([np.nan if v is None else v for v in history.get("learning_rate", [])],
                                               dtype=float))
    verdict = DIVERGED if divergence else _verdict(measures)
    evidence = ([scope, divergence] if divergence else  # the thresholds of the other verdicts say nothing here
                [scope, *_missing_notes(curves), *_curve_evidence(measures), *_whole_run_evidence(curves_all, phases, judged)])
    if divergence and phases:
        phase = phases[diverged_at]
    section = _section(phase)
    ran = n_epochs if phases is None else sum(_section(label) == section for label in phases)
    return Diagnosis(verdict=verdict, evidence=[s for s in evidence if s],
                     remedies=_remedies(verdict, measures, section, imag=bool(phases) and IMAG in phases, ran=ran),
                     phase=phase, epochs=[int(e) for e in curves.epochs], measures=measures)


def _section(phase: str | None) -> str:
    """The recipe section that sets a phase's epochs and optimizer (imag episodes are fine-tuning's)."""
    return "warmup" if phase == "warmup" else "finetune"


# --------------------------------------------------------------------------------------------
# Reading the history
# --------------------------------------------------------------------------------------------

def _curves(history: dict) -> _Curves:
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

    return _Curves(np.arange(1, n_epochs + 1), *(padded(key) for key in wanted))


def _judged_epochs(phases, usable: np.ndarray) -> tuple[np.ndarray, str | None, str]:
    """The 0-based epochs to judge, the phase they belong to, and a sentence saying which."""
    n_epochs = len(usable)
    if phases is None:
        return np.arange(n_epochs), None, f"Judged all {_count(n_epochs, 'epoch')}."
    kept = [i for i, label in enumerate(phases) if label != IMAG]
    skipped = f"; {_count(n_epochs - len(kept), 'imag epoch')} ignored" if len(kept) < n_epochs else ""
    if not kept:
        return np.array([], dtype=int), None, f"All {n_epochs} epochs are 'imag': nothing to judge."
    phase = phases[kept[-1]]
    start = len(kept)
    while start > 0 and phases[kept[start - 1]] == phase:  # the final stretch, across "imag" epochs
        start -= 1
    window = np.array(kept[start:])
    if usable[window].sum() < MIN_EPOCHS and start > 0:
        return (np.array(kept), phase,
                f"The final phase '{phase}' has {_count(usable[window].sum(), 'usable epoch')}, so all "
                f"{_count(len(kept), 'epoch')} were judged{skipped}.")
    return (window, phase, f"Judged the final phase '{phase}': epochs {window[0] + 1}-{window[-1] + 1} "
                           f"({_count(len(window), 'epoch')}{skipped}).")


def _divergence(curves: _Curves, phases) -> tuple[str, int]:
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
        first, last, lowest = train[known[0]], train[known[-1]], float(np.min(train[known]))
        if last >= DIVERGED_RISE * lowest and last > first:
            return (f"The train loss ended at {last:.3g}, {last / lowest:.0f}x its lowest ({lowest:.3g}) and above "
                    f"where it started ({first:.3g}): training diverged."), int(kept[known[-1]])
    return "", -1


def _select(curves: _Curves, indices: np.ndarray) -> _Curves:
    return _Curves(*(values[indices] for values in vars(curves).values()))


def _missing_notes(curves: _Curves) -> list[str]:
    """Sentences on what is missing: val metrics, accuracy, NaN/None epochs."""
    known = {name: np.isfinite(values).any() for name, values in vars(curves).items()}
    notes = []
    if not (known["val_loss"] or known["val_acc"]):
        notes.append("No validation metrics (val_loss, val_accuracy): judged on the training curves "
                     "alone, so over-fitting cannot be seen.")
    if not (known["train_acc"] or known["val_acc"]):
        notes.append(f"No accuracy metric ({', '.join(ACCURACY_KEYS[:3])}): judged on the losses alone.")
    holes = [~np.isfinite(values) for name, values in vars(curves).items()
             if name != "epochs" and known[name]]
    gaps = int(np.logical_or.reduce(holes).sum()) if holes else 0
    if gaps:
        notes.append(f"{gaps} of the judged epochs have missing or NaN values; those values were skipped.")
    return notes


# --------------------------------------------------------------------------------------------
# Measuring and judging
# --------------------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _last(values: np.ndarray) -> float | None:
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


def _measure(curves: _Curves) -> dict:
    """The numbers the rules and the evidence use, by name; None where unknown."""
    train_acc, val_acc = _last(curves.train_acc), _last(curves.val_acc)
    train_slope, train_change = _trend(curves.train_loss)
    val_slope, val_change = _trend(curves.val_loss)
    m = {"epochs_judged": int(curves.usable().sum()),
         "train_accuracy": train_acc, "val_accuracy": val_acc,
         "accuracy_gap": None if train_acc is None or val_acc is None else train_acc - val_acc,
         "train_loss": _last(curves.train_loss), "val_loss": _last(curves.val_loss),
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
                 train_loss_at_best=_last(curves.train_loss[:best + 1]))
    return m


def _overfit_by_val_loss(m: dict) -> bool:
    """Val loss ended VAL_LOSS_RISE above its minimum while train loss did not rise."""
    if m["val_loss_rise"] is None or m["val_loss_rise"] <= VAL_LOSS_RISE:
        return False
    return None in (m["train_loss"], m["train_loss_at_best"]) or m["train_loss"] <= m["train_loss_at_best"]


def _unstable(m: dict) -> bool:
    """Val loss ended VAL_LOSS_RISE above its minimum and train loss rose since then too."""
    return m["val_loss_rise"] is not None and m["val_loss_rise"] > VAL_LOSS_RISE \
        and None not in (m["train_loss"], m["train_loss_at_best"]) and m["train_loss"] > m["train_loss_at_best"]


def _overfit_by_gap(m: dict) -> bool:
    return m["accuracy_gap"] is not None and m["accuracy_gap"] > ACCURACY_GAP


def _underfit_by_accuracy(m: dict) -> bool:
    """Train accuracy below LOW_ACCURACY, and val accuracy too when logged."""
    return m["train_accuracy"] is not None and m["train_accuracy"] < LOW_ACCURACY \
        and (m["val_accuracy"] is None or m["val_accuracy"] < LOW_ACCURACY)


def _train_loss_steep(m: dict) -> bool:
    """Train loss still falls by STEEP_LOSS_DROP of its level and MIN_STEEP_DROP per epoch."""
    return m["train_loss_slope"] is not None and m["train_loss_change"] < -STEEP_LOSS_DROP \
        and m["train_loss_slope"] < -MIN_STEEP_DROP


def _still_learning(m: dict) -> bool:
    """Train loss falls steeply at the end, and val loss (when logged) is falling too."""
    val_falling = m["val_loss_change"] is None or m["val_loss_change"] < -FLAT_CHANGE
    return _train_loss_steep(m) and val_falling


def _verdict(m: dict) -> str:
    if m["epochs_judged"] < MIN_EPOCHS:
        return TOO_SHORT
    if _overfit_by_val_loss(m) or _overfit_by_gap(m):
        return OVER
    if _unstable(m):
        return UNSTABLE
    if _underfit_by_accuracy(m) or _still_learning(m):
        return UNDER
    return GOOD


# --------------------------------------------------------------------------------------------
# Evidence and remedies
# --------------------------------------------------------------------------------------------

def _curve_evidence(m: dict) -> list[str]:
    """One sentence each on accuracy, loss, the val loss trend, the train loss trend and instability."""
    instability = (f"Train loss rose too since the best val loss ({m['train_loss_at_best']:.3f} then, "
                   f"{m['train_loss']:.3f} now): training went unstable." if _unstable(m) else "")
    return [_accuracy_sentence(m), _loss_sentence(m), _val_trend_sentence(m), _train_trend_sentence(m), instability]


def _accuracy_sentence(m: dict) -> str:
    train, val, gap = m["train_accuracy"], m["val_accuracy"], m["accuracy_gap"]
    if gap is not None:
        side = "above" if gap > ACCURACY_GAP else "within"
        note = ("; train below val is usual with mixup/cutmix, dropout or label smoothing"
                if gap < 0 else "")
        return (f"Final accuracy: train {train:.3f} vs val {val:.3f}, a gap of {gap:.3f} "
                f"({side} the {ACCURACY_GAP:.2f} over-fitting threshold{note}).")
    if train is not None or val is not None:
        (which, value), other = (("train", train), "val") if train is not None else (("val", val), "train")
        low = f" (below {LOW_ACCURACY:.2f})" if value < LOW_ACCURACY else ""
        return f"Final {which} accuracy {value:.3f}{low}; no {other} accuracy to compare."
    return ""


def _loss_sentence(m: dict) -> str:
    parts = [f"{name} {m[key]:.3f}" for name, key in (("train", "train_loss"), ("val", "val_loss"))
             if m[key] is not None]
    return f"Final loss: {' vs '.join(parts)}." if parts else ""


def _val_trend_sentence(m: dict) -> str:
    if m["val_loss_best"] is None:
        return ""
    trend = (f"Val loss over the last {TREND_EPOCHS} epochs: {m['val_loss_slope']:+.3f} per epoch "
             f"({m['val_loss_change']:+.1%}); " if m["val_loss_slope"] is not None else "Val loss: ")
    since = m["epochs_since_best"]
    if since == 0:
        where = f"best {m['val_loss_best']:.3f} at the last epoch ({m['val_loss_best_epoch']})."
    else:
        well = " (well before it)" if since >= WELL_BEFORE_END else ""
        where = (f"best {m['val_loss_best']:.3f} at epoch {m['val_loss_best_epoch']}, "
                 f"{_count(since, 'epoch')} before the end{well}; now {m['val_loss']:.3f}, "
                 f"{m['val_loss_rise']:+.1%} above the best (over-fitting from {VAL_LOSS_RISE:+.0%}).")
    return trend + where


def _train_trend_sentence(m: dict) -> str:
    slope, change = m["train_loss_slope"], m["train_loss_change"]
    if slope is None:
        return ""
    if _train_loss_steep(m):
        state = "is still falling steeply"
    elif change < -FLAT_CHANGE:
        state = "is still falling slowly"
    elif change > FLAT_CHANGE:
        state = "is rising"
    else:
        state = "has flattened"
    return (f"Train loss {state}: {slope:+.3f} per epoch ({change:+.1%}) over the last "
            f"{TREND_EPOCHS} epochs.")


def _whole_run_evidence(curves: _Curves, phases, judged: np.ndarray) -> list[str]:
    """With phases, where the whole run (without "imag" epochs) peaked on the val curves."""
    if phases is None:
        return []
    kept = np.array([i for i, label in enumerate(phases) if label != IMAG], dtype=int)
    if len(kept) == len(judged):
        return []
    whole = _select(curves, kept)
    peaks = []
    for name, values, pick in (("val loss was lowest", whole.val_loss, np.argmin),
                               ("val accuracy was highest", whole.val_acc, np.argmax)):
        known = np.flatnonzero(np.isfinite(values))
        if known.size:
            at = int(known[pick(values[known])])
            peaks.append(f"{name} at epoch {whole.epochs[at]} ({phases[kept[at]]}): {values[at]:.3f}")
    return [f"Over the whole run ({_count(len(kept), 'epoch')} without 'imag'), {' and '.join(peaks)}."] \
        if peaks else []


_AUGMENT = ("More augmentation: `data.augment: [random_flip, rand_augment]`, plus `finetune.mixup: 0.2` "
            "or `finetune.cutmix: 1.0`.")
_REGULARISE = ("Stronger regularisation: `head.dropout: 0.3` (up to 0.5), `head.l2: 1.0e-4`, "
               "`finetune.label_smoothing: 0.1`.")
_MORE_DATA = "More data: more images per class narrows the train/val gap most reliably."
_SMALLER = ("Fewer trainable weights: unfreeze fewer layers (`finetune.unfreeze: {top_blocks: 1}`), a "
            "smaller `backbone.name`, or `strategy: extract` (a linear classifier on frozen features).")
_UNFREEZE = "Train more of the backbone: `finetune.unfreeze: {fraction: 0.5}` or `finetune.unfreeze: all`."
_CAPACITY = ("More capacity: a larger `backbone.name` (e.g. resnet50 or efficientnet_b3), a hidden head "
             "layer (`head.layers: [{dense: 256, dropout: 0.2}]`), or with `strategy: extract` a cut nearer "
             "the top (`extract.layer: top`).")
_LESS_REGULARISATION = ("Less regularisation: lower `head.dropout`, `head.l2`, `finetune.label_smoothing` "
                        "and `finetune.mixup`/`finetune.cutmix`, and drop some `data.augment` layers.")
_ADD_VAL = "Add a validation split to see over-fitting: `data.val: 0.2`."


def _early_stopping(m: dict, lead: str) -> str:
    """The early-stopping remedy, naming the epoch of the best val loss when known."""
    best = f" (epoch {m['val_loss_best_epoch']} here)" if m["val_loss_best_epoch"] else ""
    return f"{lead}: `finetune.early_stopping: {{patience: 2}}` keeps the weights of the best val loss{best}."


def _remedies(verdict: str, m: dict, section: str, imag: bool = False, ran: int | None = None) -> list[str]:
    """Concrete changes for the verdict; ``section`` is the recipe section of the judged phase,
    ``imag`` whether the run had imag episodes, ``ran`` how many epochs that section trained."""
    n = max(ran if ran is not None else m["epochs_judged"], 1)
    has_val = m["val_loss"] is not None or m["val_accuracy"] is not None
    if verdict == DIVERGED:
        now = f" (it ended at {m['learning_rate']:.3g})" if m.get("learning_rate") is not None else ""
        return [f"A much lower learning rate: `{section}.optimizer.learning_rate` 10x lower or more{now}.",
                "Warm the rate up over the first epoch: `finetune.schedule: {name: cosine, warmup_epochs: 1}`, "
                "and give the new head warm-up epochs (`warmup.epochs: 2`) before the body is unfrozen.",
                "With `precision: mixed_float16` or `mixed_bfloat16`, try `precision: float32`."]
    if verdict == TOO_SHORT:
        return [f"Train longer (`{section}.epochs: 5` or more) with a validation split (`data.val: 0.2`) "
                "so the curves can be compared."]
    if verdict == OVER:
        remedies = [_AUGMENT, _REGULARISE, _early_stopping(m, "Early stopping"), _MORE_DATA, _SMALLER]
        if _overfit_by_val_loss(m):  # val loss already turned: stopping at its minimum is the first fix
            remedies.insert(0, remedies.pop(2))
        return remedies
    if verdict == UNSTABLE:
        remedies = [f"A lower learning rate: `{section}.optimizer.learning_rate` about 3x lower, or one that "
                    f"decays (`{section}.schedule: {{name: cosine}}`).",
                    _early_stopping(m, "Keep the best epoch")]
        if imag:
            remedies.insert(0, "After an imag episode the normal head needs epochs to recover: raise "
                               "`imag.normal_epochs` (fewer episodes, longer normal stretches after them), or use "
                               "`imag.train: head` so that episodes leave the body alone.")
        return remedies
    if verdict == UNDER:
        longer = (f"Train longer: `{section}.epochs: {2 * n}` (this phase ran {n})"
                  + (", as the loss curves are still falling." if _still_learning(m) else "."))
        faster = f"A higher learning rate: raise `{section}.optimizer.learning_rate` about 3x."
        remedies = [faster, _UNFREEZE, _CAPACITY, _LESS_REGULARISATION]
        return ([longer, *remedies] if _still_learning(m) else [*remedies, longer]) \
            + ([] if has_val else [_ADD_VAL])
    if not has_val:
        return [_ADD_VAL]
    still_improving = m["epochs_since_best"] == 0 or (m["val_loss_change"] or 0.0) < -FLAT_CHANGE
    if m["val_loss_best"] is not None and still_improving:
        return [f"Val loss is still improving: a few more epochs may help, `{section}.epochs: "
                f"{n + max(2, n // 2)}`."]
    if (m["epochs_since_best"] or 0) >= WELL_BEFORE_END:
        return [_early_stopping(m, "Val loss stopped improving, so stop there")]
    return ["The curves have converged; for a last point or two try `finetune.label_smoothing: 0.1` "
            "or compare another `backbone.name`."]

