"""Read a run's training curves: under-fitting, over-fitting or a good fit, why, and what to change.

Only the per-epoch history goes in (the Keras-style dict that :func:`transferkit.reports.evaluate.plot_history`
draws), so this module is plain numpy: no Keras, no TensorFlow. The numbers and the rules that turn
them into a verdict are in :mod:`transferkit.training.curves`, the remedies in
:mod:`transferkit.training.remedies`; this module picks the judged epochs and words the evidence.

Example:
    >>> d = diagnose({"loss": [1.0, 0.5, 0.2, 0.05], "val_loss": [1.0, 0.7, 0.8, 1.1],
    ...               "accuracy": [0.6, 0.8, 0.95, 0.99], "val_accuracy": [0.6, 0.75, 0.76, 0.76]})
    >>> d.verdict
    'over-fitting'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from transferkit.training.curves import (ACCURACY_GAP, ACCURACY_KEYS, DIVERGED, FLAT_CHANGE, IMAG, LOW_ACCURACY,
                                         MIN_EPOCHS, TREND_EPOCHS, VAL_LOSS_RISE, WELL_BEFORE_END, Curves,
                                         divergence, last, measure, read_curves, select, train_loss_steep,
                                         unstable, verdict_of)
from transferkit.training.remedies import remedies_for


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


def diagnose(history: dict[str, list[float]], phases: list[str] | None = None) -> Diagnosis:
    """Judge a training history by the rules of :mod:`transferkit.training.curves`.

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
    curves_all = read_curves(history)
    n_epochs = len(curves_all.epochs)
    if phases is not None and len(phases) != n_epochs:
        raise ValueError(f"phases has {len(phases)} labels for {n_epochs} epochs: give one per epoch")
    judged, phase, scope = _judged_epochs(phases, curves_all.usable())
    curves = select(curves_all, judged)
    measures = measure(curves)
    divergence_text, diverged_at = divergence(curves_all, phases)
    measures["learning_rate"] = last(np.array([np.nan if v is None else v for v in history.get("learning_rate", [])],
                                              dtype=float))
    verdict = DIVERGED if divergence_text else verdict_of(measures)
    if divergence_text:  # the thresholds of the other verdicts say nothing here
        evidence = [scope, divergence_text]
    else:
        evidence = [scope, *_missing_notes(curves), *_curve_evidence(measures),
                    *_whole_run_evidence(curves_all, phases, judged)]
    if divergence_text and phases:
        phase = phases[diverged_at]
    section = _section(phase)
    ran = n_epochs if phases is None else sum(_section(label) == section for label in phases)
    return Diagnosis(verdict=verdict, evidence=[s for s in evidence if s],
                     remedies=remedies_for(verdict, measures, section, imag=bool(phases) and IMAG in phases, ran=ran),
                     phase=phase, epochs=[int(e) for e in curves.epochs], measures=measures)


def _section(phase: str | None) -> str:
    """The recipe section that sets a phase's epochs and optimizer (imag episodes are fine-tuning's)."""
    return "warmup" if phase == "warmup" else "finetune"


def _count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# The judged epochs, and the evidence in words
# --------------------------------------------------------------------------------------------

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


def _missing_notes(curves: Curves) -> list[str]:
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


def _curve_evidence(m: dict) -> list[str]:
    """One sentence each on accuracy, loss, the val loss trend, the train loss trend and instability."""
    instability = (f"Train loss rose too since the best val loss ({m['train_loss_at_best']:.3f} then, "
                   f"{m['train_loss']:.3f} now): training went unstable." if unstable(m) else "")
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
    if train_loss_steep(m):
        state = "is still falling steeply"
    elif change < -FLAT_CHANGE:
        state = "is still falling slowly"
    elif change > FLAT_CHANGE:
        state = "is rising"
    else:
        state = "has flattened"
    return (f"Train loss {state}: {slope:+.3f} per epoch ({change:+.1%}) over the last "
            f"{TREND_EPOCHS} epochs.")


def _whole_run_evidence(curves: Curves, phases, judged: np.ndarray) -> list[str]:
    """With phases, where the whole run (without "imag" epochs) peaked on the val curves."""
    if phases is None:
        return []
    kept = np.array([i for i, label in enumerate(phases) if label != IMAG], dtype=int)
    if len(kept) == len(judged):
        return []
    whole = select(curves, kept)
    peaks = []
    for name, values, pick in (("val loss was lowest", whole.val_loss, np.argmin),
                               ("val accuracy was highest", whole.val_acc, np.argmax)):
        known = np.flatnonzero(np.isfinite(values))
        if known.size:
            at = int(known[pick(values[known])])
            peaks.append(f"{name} at epoch {whole.epochs[at]} ({phases[kept[at]]}): {values[at]:.3f}")
    return [f"Over the whole run ({_count(len(kept), 'epoch')} without 'imag'), {' and '.join(peaks)}."] \
        if peaks else []
