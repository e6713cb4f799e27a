"""The statistics, tables and plot of a comparison of training modes over seeds
(:func:`transferkit.strategies.compare.compare` trains the runs).

Statistics, per mode: mean ± std over seeds of the final and best validation top-1 and loss. Per
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
            "final_loss": "final val loss", "best_loss": "best val loss"}


def summarize(curves: dict[str, list[dict]], seeds: list[int]) -> dict:
    """Per-run measures, per-mode mean/std, and paired differences against the first mode."""
    measures = {mode: [run_measures(history) for history in histories] for mode, histories in curves.items()}
    modes = list(curves)
    summary = {"seeds": seeds, "modes": modes, "runs": measures, "stats": {}, "differences": {}}
    for mode in modes:
        summary["stats"][mode] = {key: _mean_std([m[key] for m in measures[mode]]) for key in MEASURES}
    for mode in modes[1:]:
        summary["differences"][mode] = {
            key: paired_difference([m[key] for m in measures[modes[0]]], [m[key] for m in measures[mode]])
            for key in MEASURES}
    return summary


def run_measures(history: dict) -> dict[str, float]:
    """Final and best validation top-1 and loss of one run's history (epochs without values skipped)."""
    top1 = np.array([np.nan if v is None else v for v in history["val_accuracy"]], dtype=float)
    loss = np.array([np.nan if v is None else v for v in history["val_loss"]], dtype=float)
    return {"final_top1": float(top1[np.isfinite(top1)][-1]), "best_top1": float(np.nanmax(top1)),
            "final_loss": float(loss[np.isfinite(loss)][-1]), "best_loss": float(np.nanmin(loss)),
            "epochs": len(top1)}


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
    lines = [f"# Comparison over seeds {', '.join(map(str, summary['seeds']))}", "",
             "| mode | " + " | ".join(MEASURES.values()) + " |", "|---" * (len(MEASURES) + 1) + "|"]
    for mode in modes:
        cells = [f"{s['mean']:.4f} ± {s['std']:.4f}" for s in summary["stats"][mode].values()]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    for mode in modes[1:]:
        lines += ["", f"## {mode} − {first} (paired by seed)", "",
                  "| measure | mean difference | 95% CI | paired t-test p |", "|---|---|---|---|"]
        for key, label in MEASURES.items():
            d = summary["differences"][mode][key]
            lines.append(f"| {label} | {d['mean']:+.4f} | [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | {d['p']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(curves: dict[str, list[dict]], path) -> None:
    """Mean validation top-1 and loss per epoch for each mode, with a ±1 std band over seeds;
    imag epochs are shaded grey."""
    from transferkit.reports.evaluate import new_figure, save_png

    fig = new_figure(figsize=(11, 4))
    for ax, (key, label) in zip(fig.subplots(1, 2), (("val_accuracy", "val top-1"), ("val_loss", "val loss"))):
        for i, (mode, histories) in enumerate(curves.items()):
            length = max(len(h[key]) for h in histories)
            values = np.full((len(histories), length), np.nan)
            for row, history in zip(values, histories):
                row[:len(history[key])] = [np.nan if v is None else v for v in history[key]]
            epochs = np.arange(1, length + 1)
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            ax.plot(epochs, mean, marker="o", markersize=3, color=f"C{i}", label=f"{mode} (n={len(histories)})")
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        imag = {epoch for histories in curves.values() for h in histories
                for epoch, phase in enumerate(h.get("phase", []), start=1) if phase == "imag"}
        for epoch in sorted(imag):  # the same episode plan for every seed
            ax.axvspan(epoch - 0.5, epoch + 0.5, color="0.85", zorder=0)
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("validation curves: mean ± 1 std over seeds")
    save_png(fig, path)


def _mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
