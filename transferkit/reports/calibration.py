"""Calibration: how far predicted confidence is from accuracy, and temperature scaling to close it.

* :func:`expected_calibration_error`: ECE over equal-width confidence bins (15 by default): the
  mean gap between a bin's confidence and its accuracy, weighted by the bin's share of samples.
* :func:`fit_temperature`: the one scalar ``T`` that minimises the log-loss of ``softmax(log p / T)``
  on a split (the validation split), found by a bounded 1-D search over ``log T``. For a softmax or
  logistic model ``log p`` is the logits up to a constant, so this is temperature scaling on the logits.
* :func:`apply_temperature`: those probabilities, for any ``T``.
* :func:`plot_reliability`: the reliability diagram (accuracy per confidence bin, before and after).

Only numpy arrays come in; figures use matplotlib's object API with the Agg renderer.

Example:
    >>> temperature = fit_temperature(y_val, val_probabilities)
    >>> expected_calibration_error(y_test, apply_temperature(test_probabilities, temperature))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


ECE_BINS = 15
#: Probabilities are clipped here before the log (float32 models give exact zeros).
LOG_FLOOR = 1e-12
#: The temperature is searched within these bounds (a wider one never helps a trained model).
TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(probabilities, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise, float64."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(y_true, probabilities) -> float:
    """The temperature that minimises the mean log-loss of ``apply_temperature(probabilities, T)``.

    Args:
        y_true: (N,) class indices.
        probabilities: (N, C) probabilities, rows summing to 1.

    Returns:
        ``T`` within :data:`TEMPERATURE_RANGE`; 1.0 for an empty split.
    """
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true, dtype=int)
    if not len(y_true):
        return 1.0
    rows = np.arange(len(y_true))

    def loss(log_temperature: float) -> float:
        scaled = apply_temperature(probabilities, np.exp(log_temperature))
        return float(-np.log(np.clip(scaled[rows, y_true], LOG_FLOOR, 1.0)).mean())

    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    best = float(found.x) if loss(found.x) < loss(0.0) else 0.0  # never worse than leaving it alone
    return float(np.exp(best))


def reliability_bins(y_true, probabilities, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin with samples: ``{low, high, n, confidence, accuracy}``."""
    probs = np.asarray(probabilities, dtype=np.float64)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y_true, dtype=int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (low, high]
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "n": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def expected_calibration_error(y_true, probabilities, bins: int = ECE_BINS) -> float:
    """ECE: ``sum_b n_b / N * |accuracy_b - confidence_b|`` over equal-width confidence bins."""
    table = reliability_bins(y_true, probabilities, bins)
    total = sum(row["n"] for row in table)
    return float(sum(row["n"] / total * abs(row["accuracy"] - row["confidence"]) for row in table)) if total else 0.0


def plot_reliability(y_true, curves: dict[str, np.ndarray], path: str | Path, title: str = "",
                     bins: int = ECE_BINS) -> None:
    """Write a reliability diagram: accuracy against confidence per bin, one line per entry of
    ``curves`` (label -> probabilities, e.g. before and after temperature scaling), with its ECE."""
    from transferkit.reports.evaluate import new_figure, save_png

    figure = new_figure(figsize=(4.8, 4.8))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfectly calibrated")
    for label, probabilities in curves.items():
        table = reliability_bins(y_true, probabilities, bins)
        ece = expected_calibration_error(y_true, probabilities, bins)
        axes.plot([r["confidence"] for r in table], [r["accuracy"] for r in table], marker="o", markersize=3,
                  label=f"{label} (ECE {ece:.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
             title=title or "reliability")
    axes.legend(loc="upper left", fontsize="small")
    save_png(figure, path)


def write_calibrated_reports(folder, raw: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str], *,
                             paths: dict[str, list[str]] | None = None, fit: bool = True) -> tuple[float, dict]:
    """Fit the temperature on ``raw["val"]`` and write every split's report from the calibrated probabilities.

    Args:
        folder: the run folder the reports go to.
        raw: split name -> ``(labels, probabilities)`` as the model gives them.
        class_names: the class names in index order.
        paths: split name -> its image paths, for the predictions and mistakes files.
        fit: fit a temperature (``calibrate: temperature``); without it, or without a val split, 1.0.

    Returns:
        ``(temperature, {split: metrics})``, the metrics of :func:`transferkit.reports.evaluate.write_report`.
    """
    from transferkit.reports.evaluate import write_report

    temperature = fit_temperature(*raw["val"]) if fit and "val" in raw else 1.0
    metrics = {}
    for name, (labels, probabilities) in raw.items():
        calibrated = apply_temperature(probabilities, temperature) if temperature != 1.0 else probabilities
        metrics[name] = write_report(folder, labels, calibrated, class_names, paths=(paths or {}).get(name),
                                     prefix=name, uncalibrated=probabilities, temperature=temperature)
    return temperature, metrics
