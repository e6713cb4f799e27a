"""The statistics, tables and plot of a comparison of training modes over seeds
(:func:`transferkit.strategies.compare.compare` trains the runs).

Statistics, per mode: mean ± std over seeds of the final and best validation and training top-1 and
loss (training epochs of imag episodes, which train on imagined labels, are left out), and the validation
balanced accuracy of each run's model (given the runs' validation metrics). Per
mode against the first: the paired difference (same seed, same split), its 95% confidence
interval from Student's t, and the paired t-test's two-sided p-value.

Example:
    >>> summary = summarize({"normal": histories_a, "imag": histories_b}, seeds=[0, 1, 2])
    >>> summary["differences"]["imag"]["best_top1"]["mean"]
"""

from __future__ import annotations

import math

import numpy as np


MEASURES = {"final_top1": "final val top-1", "best_top1": "best val top-1",
            "balanced_accuracy": "val balanced accuracy of the run's model",
            "final_loss": "final val loss", "best_loss": "best val loss",
            "final_train_top1": "final train top-1", "best_train_top1": "best train top-1",
            "final_train_loss": "final train loss", "best_train_loss": "best train loss"}


def summarize(curves: dict[str, list[dict]], seeds: list[int], val_metrics: dict[str, list] | None = None) -> dict:
    """Per-run measures, per-mode mean/std, and paired differences against the first mode; ``val_metrics``
    holds each run's validation metrics (:func:`transferkit.reports.evaluate.evaluate_predictions`) in
    the order of ``curves``."""
    val_metrics = val_metrics or {}
    measures = {mode: [run_measures(history, metrics) for history, metrics in
                       zip(histories, val_metrics.get(mode) or [None] * len(histories))]
                for mode, histories in curves.items()}
    modes = list(curves)
    summary = {"seeds": seeds, "modes": modes, "runs": measures, "stats": {}, "differences": {}}
    for mode in modes:
        summary["stats"][mode] = {key: _mean_std([m[key] for m in measures[mode]]) for key in MEASURES}
    for mode in modes[1:]:
        summary["differences"][mode] = {
            key: paired_difference([m[key] for m in measures[modes[0]]], [m[key] for m in measures[mode]])
            for key in MEASURES}
    return summary


def run_measures(history: dict, val_metrics: dict | None = None) -> dict[str, float]:
    """Final and best validation and training top-1 and loss of one run's history. Epochs without a
    value are skipped (training ones in imag episodes, whose own task is logged as ``imag_*``); a run
    without any training value gets NaN there. The balanced accuracy comes from ``val_metrics`` (NaN without)."""
    measures = {}
    for prefix, split in (("val_", ""), ("", "train_")):
        top1, loss = _values(history, f"{prefix}accuracy"), _values(history, f"{prefix}loss")
        measures |= {f"final_{split}top1": _last(top1), f"best_{split}top1": _extreme(top1, np.max),
                     f"final_{split}loss": _last(loss), f"best_{split}loss": _extreme(loss, np.min)}
    balanced = val_metrics.get("balanced_accuracy", math.nan) if val_metrics else math.nan
    return measures | {"balanced_accuracy": balanced, "epochs": len(history["val_accuracy"])}


def _values(history: dict, key: str) -> np.ndarray:
    values = np.array([np.nan if v is None else v for v in history.get(key, [])], dtype=float)
    return values[np.isfinite(values)]


def _last(values: np.ndarray) -> float:
    return float(values[-1]) if len(values) else math.nan


def _extreme(values: np.ndarray, pick) -> float:
    return float(pick(values)) if len(values) else math.nan


def paired_difference(first, second, confidence: float = 0.95) -> dict:
    """``second - first`` per seed: mean, the t confidence interval and the paired t-test's p-value.

    With identical differences (zero spread) the interval is a point and the p-value is 1 for a zero
    mean, 0 otherwise.
    """
    from scipy import stats

    d = np.asarray(second, dtype=float) - np.asarray(first, dtype=float)
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        return {"mean": mean, "ci": [math.nan, math.nan], "p": math.nan, "n": n}
    if sd == 0:
        return {"mean": mean, "ci": [mean, mean], "p": 1.0 if mean == 0 else 0.0, "n": n}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci": [mean - half, mean + half], "p": float(stats.ttest_rel(second, first).pvalue),
            "n": n}


def to_markdown(summary: dict) -> str:
    """The comparison as Markdown tables."""
    modes, first = summary["modes"], summary["modes"][0]
    lines = [f"# Comparison over seeds {', '.join(map(str, summary['seeds']))}", ""]
    lines += [f"- {mode}: {', '.join(given)}" for mode, given in summary.get("settings", {}).items() if given]
    lines += [""] if any(summary.get("settings", {}).values()) else []
    lines += ["| measure (mean ± std) | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for key, label in MEASURES.items():
        cells = [f"{summary['stats'][mode][key]['mean']:.4f} ± {summary['stats'][mode][key]['std']:.4f}"
                 for mode in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for mode in modes[1:]:
        lines += ["", f"## {mode} − {first} (paired by seed)", "",
                  "| measure | mean difference | 95% CI | paired t-test p |", "|---|---|---|---|"]
        for key, label in MEASURES.items():
            d = summary["differences"][mode][key]
            lines.append(f"| {label} | {d['mean']:+.4f} | [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | {d['p']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(curves: dict[str, list[dict]], path) -> None:
    """Mean top-1 and loss per epoch for each mode, validation solid and training dashed, with a ±1 std
    band over seeds; imag epochs are shaded grey."""
    from transferkit.reports.evaluate import new_figure, save_png

    fig = new_figure(figsize=(11, 4))
    for ax, (key, label) in zip(fig.subplots(1, 2), (("accuracy", "top-1"), ("loss", "loss"))):
        for i, (mode, histories) in enumerate(curves.items()):
            for prefix, style in (("val_", "-"), ("", "--")):
                epochs, mean, std = _mean_curve(histories, prefix + key)
                ax.plot(epochs, mean, style, marker="o", markersize=3, color=f"C{i}",
                        label=f"{mode} {'val' if prefix else 'train'} (n={len(histories)})")
                ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.15 if prefix else 0.08)
        imag = {epoch for histories in curves.values() for h in histories
                for epoch, phase in enumerate(h.get("phase", []), start=1) if phase == "imag"}
        for epoch in sorted(imag):  # the same episode plan for every seed
            ax.axvspan(epoch - 0.5, epoch + 0.5, color="0.85", zorder=0)
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("validation (solid) and training (dashed) curves: mean ± 1 std over seeds")
    save_png(fig, path)


def _mean_curve(histories: list[dict], key: str):
    """Epochs, and the mean and std over runs of ``key`` per epoch (NaN where no run has a value)."""
    import warnings

    length = max(len(h.get(key, [])) for h in histories)
    values = np.full((len(histories), length), np.nan)
    for row, history in zip(values, histories):
        row[:len(history.get(key, []))] = [np.nan if v is None else v for v in history.get(key, [])]
    with warnings.catch_warnings():  # an epoch no run has a value for (training in imag episodes) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.arange(1, length + 1), np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def _mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
