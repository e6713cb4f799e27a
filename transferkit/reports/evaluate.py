"""Evaluation reports: metrics, confusion matrix, per-sample predictions and training curves.

Only numpy arrays come in, so every strategy (scikit-learn on features, fine-tuned Keras) gets the
same report. Every file is written atomically. Figures use matplotlib's object API (``Figure``)
with the Agg renderer: no pyplot, no global backend switch, nothing left open after saving.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from transferkit.io import atomic_path, atomic_write_json, atomic_write_text

PROB_FLOOR = 1e-7  # probabilities are clipped here before the log, so one sure mistake stays finite
MISTAKE_FIELDS = ["path", "true", "predicted", "prob_predicted", "prob_true", "loss"]


def evaluate_predictions(y_true, probabilities, class_names, paths=None) -> dict:
    """Top-1/top-5 accuracy, loss, per-class scores and the confusion matrix.

    Args:
        y_true: (N,) class indices into ``class_names``.
        probabilities: (N, C) class probabilities, rows summing to 1, C = len(class_names).
        class_names: the C class names in index order.
        paths: optional N sample paths (only their count is checked here).
    Returns:
        A JSON-clean dict: n, top1, top5 (only when C >= 5), loss (mean cross-entropy),
        balanced_accuracy, per_class {name: {precision, recall, f1, support}}, macro_f1 (over
        classes in y_true or predicted), confusion_matrix (rows true, columns predicted).

    Example:
        >>> evaluate_predictions([0, 1], [[0.9, 0.1], [0.4, 0.6]], ["cat", "dog"])["top1"]
        1.0
    """
    y_true, probs = _validate(y_true, probabilities, class_names, paths)
    labels = np.arange(len(class_names))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    metrics = {"n": len(y_true), "top1": float(skm.accuracy_score(y_true, y_pred))}
    if len(labels) >= 5:
        with warnings.catch_warnings():  # with exactly 5 classes sklearn warns that top-5 is trivial
            warnings.simplefilter("ignore", UserWarning)
            metrics["top5"] = float(skm.top_k_accuracy_score(y_true, probs, k=5, labels=labels))
    metrics["loss"] = float(_sample_losses(y_true, probs).mean())
    metrics["balanced_accuracy"] = float(recall[support > 0].mean())  # sklearn's, minus its warning
    metrics["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)}
    metrics["macro_f1"] = float(f1[(support > 0) | np.isin(labels, y_pred)].mean())
    metrics["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return metrics


def write_report(folder, y_true, probabilities, class_names, paths=None, *, prefix="test",
                 worst=20, uncalibrated=None, temperature: float = 1.0) -> dict:
    """Write metrics, confusion matrix (CSV + PNG), reliability diagram, predictions, mistakes (CSV, and with
    ``paths`` a PNG grid of their thumbnails) and a summary.

    Args:
        folder: the run folder (created if needed); files are named ``{prefix}_...``.
        y_true, probabilities, class_names, paths: as for :func:`evaluate_predictions`.
        prefix: which split this is, e.g. "test" or "val".
        worst: how many of the highest-loss wrong predictions go into the mistakes CSV.
        uncalibrated, temperature: the probabilities before temperature scaling, and the temperature
            that made ``probabilities`` of them; reported beside (``calibration``) and drawn with them.
    Returns:
        The metrics dict, as written to ``{prefix}_metrics.json``: :func:`evaluate_predictions`'s, with
        ``ece`` and, after temperature scaling, ``calibration`` {temperature, ece_before, loss_before}.
    """
    metrics = evaluate_predictions(y_true, probabilities, class_names, paths)
    metrics.update(_calibration(folder, y_true, probabilities, uncalibrated, temperature, prefix))
    y_true, probs = _validate(y_true, probabilities, class_names, paths)
    rows, losses = _prediction_rows(y_true, probs, class_names, paths)
    wrong = probs.argmax(axis=1) != y_true
    mistakes = [rows[i] for i in np.argsort(-losses, kind="stable") if wrong[i]][:worst]
    fields = [f for f in rows[0] if paths is not None or f != "path"]
    mistake_fields = [f for f in MISTAKE_FIELDS if f in fields]
    matrix, stem = metrics["confusion_matrix"], f"{Path(folder) / prefix}_"
    atomic_write_json(stem + "metrics.json", metrics)
    _write_csv(stem + "confusion_matrix.csv", ["true\\predicted", *class_names],
               [[name, *row] for name, row in zip(class_names, matrix)])
    _plot_confusion(matrix, class_names, stem + "confusion_matrix.png",
                    title=f"{prefix}: top-1 {metrics['top1']:.3f} (n={metrics['n']})")
    _write_csv(stem + "predictions.csv", fields, [[r[f] for f in fields] for r in rows])
    _write_csv(stem + "mistakes.csv", mistake_fields,
               [[r[f] for f in mistake_fields] for r in mistakes])
    if paths is not None:
        from transferkit.reports.mistakes import plot_mistakes
        plot_mistakes(mistakes, stem + "mistakes.png", title=f"{prefix}: worst mistakes")
    atomic_write_text(stem + "report.txt", _report_text(metrics, mistakes[:5], prefix))
    return metrics


def _calibration(folder, y_true, probabilities, uncalibrated, temperature: float, prefix: str) -> dict:
    """ECE (before and after temperature scaling, when it was done) and the reliability diagram."""
    from transferkit.reports.calibration import expected_calibration_error, plot_reliability

    y_true = np.asarray(y_true, dtype=int)
    found = {"ece": expected_calibration_error(y_true, probabilities)}
    curves = {"model": probabilities}
    if uncalibrated is not None and temperature != 1.0:
        found["calibration"] = {"temperature": float(temperature),
                                "ece_before": expected_calibration_error(y_true, uncalibrated),
                                "loss_before": float(_sample_losses(y_true, np.asarray(uncalibrated)).mean())}
        curves = {"before": uncalibrated, f"after (temperature {temperature:.2f})": probabilities}
    plot_reliability(y_true, curves, f"{Path(folder) / prefix}_reliability.png", title=f"{prefix}: reliability")
    return found


def format_metrics(metrics: dict, weakest: int = 3) -> str:
    """A few console lines: top-1, balanced accuracy (the mean recall over classes, which an imbalanced
    split tells apart from top-1), top-5, loss and n, then the weakest classes by F1.

    Args:
        metrics: a dict from :func:`evaluate_predictions`.
        weakest: how many of the lowest-F1 classes to name.
    Returns:
        e.g. ``"top-1 0.912  balanced accuracy 0.897  top-5 0.998  loss 0.281  (n=863)\\nweakest by F1: rose
        0.801, ..."``.
    """
    parts = [f"top-1 {metrics['top1']:.3f}", f"balanced accuracy {metrics['balanced_accuracy']:.3f}"]
    if "top5" in metrics:
        parts.append(f"top-5 {metrics['top5']:.3f}")
    parts += [f"loss {metrics['loss']:.3f}", *([f"ECE {metrics['ece']:.3f}"] if "ece" in metrics else []),
              f"(n={metrics['n']})"]
    scored = sorted((c["f1"], name) for name, c in metrics["per_class"].items() if c["support"])
    weak = ", ".join(f"{name} {f1:.3f}" for f1, name in scored[:weakest])
    return "  ".join(parts) + (f"\nweakest by F1: {weak}" if weak else "")


def plot_history(history: dict[str, list[float]], path, *, phases: list[str] | None = None,
                 title=None) -> None:
    """Training curves as a PNG: a loss panel and an accuracy panel (keys with "acc" or "top").

    Args:
        history: metric name -> one value per epoch (``val_`` keys are drawn dashed in the colour
            of their training twin); NaN/None epochs are skipped, the line joins the rest.
        path: where the PNG goes.
        phases: optional label per epoch, e.g. ["warmup", "warmup", "finetune", ...]; phase
            boundaries get dashed lines and names, and "imag" epochs are shaded grey.
        title: figure title (default "training curves").
    """
    series = {k: np.array([np.nan if v is None else v for v in vals], dtype=float)
              for k, vals in history.items()}
    panels = [(label, keys) for label, keys in (
        ("loss", [k for k in series if "loss" in k]),
        ("accuracy", [k for k in series if "loss" not in k and ("acc" in k or "top" in k)]))
        if keys]
    if not panels:
        raise ValueError(f"history has no loss or accuracy keys to plot (it has {sorted(history)})")
    epochs = max(len(series[k]) for _, keys in panels for k in keys)
    if phases is not None and len(phases) != epochs:
        raise ValueError(f"phases has {len(phases)} labels for {epochs} epochs: give one per epoch")
    fig = new_figure(figsize=(5.5 * len(panels), 4.0))
    bases = list(dict.fromkeys(k.removeprefix("val_") for k in series))
    for ax, (label, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            epoch = np.arange(1, len(series[key]) + 1)
            known = np.isfinite(series[key])  # NaN epochs lose their marker, the line goes on
            ax.plot(epoch[known], series[key][known], marker="o", markersize=3,
                    linestyle="--" if key.startswith("val_") else "-", label=key,
                    color=f"C{bases.index(key.removeprefix('val_')) % 10}")
        if phases:
            _mark_phases(ax, phases)
        ax.set(xlabel="epoch", ylabel=label, xlim=(0.5, epochs + 0.5))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "training curves")
    save_png(fig, path)


def _validate(y_true, probabilities, class_names, paths):
    """Check shapes and values; return (int labels, float64 probabilities) or raise ValueError."""
    n_classes = len(class_names)
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(probs) == 0:
        raise ValueError(f"probabilities must have shape (N>0, {n_classes}) for {n_classes} class "
                         f"names, got {probs.shape}")
    if len(set(class_names)) != n_classes:
        raise ValueError(f"class_names must be unique, got {list(class_names)}")
    if labels.shape != (len(probs),) or labels.dtype.kind not in "iuf" \
            or np.any(labels != np.round(labels)) or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"y_true must be {len(probs)} class indices in 0..{n_classes - 1}")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-2):
        raise ValueError("probabilities must be >= 0 with rows summing to 1: apply softmax to logits")
    if paths is not None and len(paths) != len(probs):
        raise ValueError(f"got {len(paths)} paths for {len(probs)} predictions")
    return labels.astype(int), probs


def _sample_losses(y_true, probs):
    """Cross-entropy of each sample: -log p(true class), with p clipped at PROB_FLOOR."""
    return -np.log(np.clip(probs[np.arange(len(y_true)), y_true], PROB_FLOOR, 1.0))


def _prediction_rows(y_true, probs, class_names, paths):
    """One dict per sample (path, true, predicted, probs, loss, top-k) and the loss array."""
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :min(5, len(class_names))]
    losses = _sample_losses(y_true, probs)
    rows = [{"path": "" if paths is None else str(paths[i]),
             "true": class_names[true], "predicted": class_names[top[0]],
             "prob_predicted": round(float(probs[i, top[0]]), 6),
             "prob_true": round(float(probs[i, true]), 6), "loss": round(float(losses[i]), 6),
             "top_k": ";".join(f"{class_names[j]}:{probs[i, j]:.4f}" for j in top)}
            for i, (true, top) in enumerate(zip(y_true, ranked))]
    return rows, losses


def _write_csv(path, header, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _report_text(metrics, mistakes, prefix) -> str:
    """The human-readable summary: headline, per-class table, worst mistakes."""
    width = max(12, *(len(name) for name in metrics["per_class"]))
    lines = [f"{prefix} evaluation", format_metrics(metrics), f"macro-F1 {metrics['macro_f1']:.3f}"]
    if "calibration" in metrics:
        c = metrics["calibration"]
        lines.append(f"temperature scaling (fitted on val): temperature {c['temperature']:.3f}, ECE "
                     f"{c['ece_before']:.3f} -> {metrics['ece']:.3f}, loss {c['loss_before']:.3f} -> "
                     f"{metrics['loss']:.3f}")
    lines += ["",
             f"{'':>{width}}  precision  recall  f1-score  support"]
    lines += [f"{name:>{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:8.3f}  "
              f"{c['support']:7d}" for name, c in metrics["per_class"].items()]
    lines += ["", f"worst mistakes ({len(mistakes)} shown):" if mistakes else "no mistakes"]
    lines += [f"  loss {m['loss']:6.3f}  true {m['true']}  predicted {m['predicted']} "
              f"(p={m['prob_predicted']:.3f})  {m.get('path') or ''}".rstrip() for m in mistakes]
    return "\n".join(lines) + "\n"


def _plot_confusion(matrix, class_names, path, *, title):
    """Counts annotated on a row-normalised heat map; sizes scale with the number of classes."""
    counts = np.asarray(matrix)
    n = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = float(np.clip(1.5 + 0.38 * n, 4.5, 18.0))
    cell_pt = 72 * side * 0.7 / n
    digits = len(str(counts.max()))
    count_font = float(np.clip(cell_pt / (0.65 * digits + 1.2), 5, 13))
    names = [name if len(name) <= 24 else name[:23] + "…" for name in class_names]
    fig = new_figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    for (row, col), count in np.ndenumerate(counts):
        if count or n <= 20:  # with many classes, blank cells read better than a sea of zeros
            ax.text(col, row, str(count), ha="center", va="center", fontsize=count_font,
                    color="white" if fractions[row, col] > 0.55 else "black")
    tick_font = float(np.clip(cell_pt * 0.45, 6, 11))
    ax.set_xticks(range(n), names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center",
                  rotation_mode="anchor", fontsize=tick_font)
    ax.set_yticks(range(n), names, fontsize=tick_font)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save_png(fig, path)


def _mark_phases(ax, phases):
    """Dashed lines and names at phase boundaries; shade "imag" epochs light grey."""
    starts = [i for i in range(len(phases)) if i == 0 or phases[i] != phases[i - 1]]
    named = len(starts) <= 8  # more names would crowd; the shading and legend still tell
    if named:
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.22 * (high - low))  # headroom: the names sit above the curves
    shaded = False
    for start, end in zip(starts, starts[1:] + [len(phases)]):
        if phases[start] == "imag":
            ax.axvspan(start + 0.5, end + 0.5, color="0.9", zorder=0,
                       label="_imag" if shaded else "imag epochs")
            shaded = True
        if start:
            ax.axvline(start + 0.5, color="0.45", linestyle="--", linewidth=0.8)
        if named:
            ax.text(start + 0.6, 0.98, phases[start], transform=ax.get_xaxis_transform(),
                    rotation=90, ha="left", va="top", fontsize=7, color="0.35")


def new_figure(figsize):
    """A matplotlib Figure with constrained layout, made without pyplot (for `save_png`)."""
    from matplotlib.figure import Figure  # lazily: importing this module stays cheap

    return Figure(figsize=figsize, layout="constrained")


def save_png(fig, path):
    """Render with Agg (no pyplot, no global backend change) and write atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
