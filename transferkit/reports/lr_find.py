"""The plot of a learning-rate sweep (``transferkit lr-find``): the loss against the learning rate."""

from __future__ import annotations

import numpy as np

from transferkit.reports.evaluate import new_figure, save_png


def plot_lr_find(learning_rates, losses, path, *, raw_losses=None, suggestions: dict | None = None,
                 chosen: str | None = None, title: str | None = None) -> None:
    """The smoothed loss against the learning rate (log axis) as a PNG, the suggestions marked.

    Args:
        learning_rates, losses: one per step of the sweep (``losses`` smoothed).
        path: where the PNG goes.
        raw_losses: each step's own loss, drawn faintly behind the smoothed curve.
        suggestions: name -> ``{"learning_rate", "loss"}``, each drawn as a point and named in the legend.
        chosen: the name of the suggestion the user is given (drawn with a vertical line).
        title: the figure's title (default "learning-rate finder").
    """
    rates, curve = np.asarray(learning_rates, dtype=float), np.asarray(losses, dtype=float)
    fig = new_figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    shown = np.isfinite(curve)
    if raw_losses is not None:
        raw = np.asarray(raw_losses, dtype=float)
        ax.plot(rates[np.isfinite(raw)], raw[np.isfinite(raw)], color="C0", alpha=0.25, linewidth=1, label="loss per step")
    ax.plot(rates[shown], curve[shown], color="C0", linewidth=2, label="smoothed loss")
    for index, (name, point) in enumerate((suggestions or {}).items()):
        ax.plot(point["learning_rate"], point["loss"], "o", markersize=8, color=f"C{index + 1}",
                label=f"{name}: {point['learning_rate']:.2e}")
        if name == chosen:
            ax.axvline(point["learning_rate"], color=f"C{index + 1}", linestyle="--", linewidth=1)
    if shown.any():  # the smoothed curve sets the scale: a diverging step's own loss is off the top
        low, high = curve[shown].min(), curve[shown].max()
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - margin, high + margin)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "learning-rate finder")
    save_png(fig, path)
