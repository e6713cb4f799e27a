"""Compare training modes (normal fine-tuning vs imag) over several seeds on the same split and budget.

Each (mode, seed) is an ordinary run folder under ``<output>/runs/``, so an interrupted comparison
picks up where it stopped: finished runs are read back, an unfinished one resumes. The summary
goes to ``compare.json``, ``compare.md`` and ``curves.png`` (mean validation curves with a ±1 std
band per mode, imag epochs shaded).

Statistics, per mode: mean ± std over seeds of the final and best validation top-1 and loss. Per
mode against the first: the paired difference (same seed, same split), its 95% confidence
interval from Student's t, and the paired t-test's two-sided p-value.

Example:
    >>> summary = compare("recipes/digits8_imag.yaml", modes=["normal", "imag"], seeds=3)
    >>> summary["differences"]["imag"]["best_top1"]["mean"]
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from transferkit.errors import RecipeError
from transferkit.io import atomic_write_json, atomic_write_text, disk_full_is_one_line
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import folder_lock
from transferkit.recipe import Recipe, load_recipe

log = logging.getLogger("transferkit")

MODES = {"normal": "finetune", "imag": "imag"}
MEASURES = {"final_top1": "final val top-1", "best_top1": "best val top-1",
            "final_loss": "final val loss", "best_loss": "best val loss"}


def compare(recipe: Recipe | str | Path, modes=("normal", "imag"), seeds: int = 3, *, backbone=None, head=None,
            output: str | Path | None = None, progress: bool = False) -> dict:
    """Train every mode with ``seeds`` seeds and write the comparison.

    Args:
        recipe: the recipe (its ``imag`` section configures imag mode); ``strategy`` is set per mode.
        modes: names from :data:`MODES`.
        seeds: seeds per mode: the recipe's seed, +1, +2, ...; the split stays the recipe's.
        backbone, head: as for :func:`transferkit.strategies.finetune.finetune` (give a backbone
            as a function so that each run starts from fresh weights).
        output: the comparison folder; default ``<recipe output>/compare``.
        progress: show Keras' progress bars.

    Returns:
        The summary written to ``compare.json``.

    Raises:
        ResourceError: another comparison uses the folder, or the disk is full.
    """
    log_to_stderr_unless_configured()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    modes = list(modes)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or len(modes) < 2 or len(set(modes)) != len(modes):
        raise RecipeError(f"compare: modes must be two or more distinct names of {', '.join(MODES)}, got "
                          f"{','.join(map(str, modes))}")
    if seeds < 2:
        raise RecipeError(f"compare: needs at least 2 seeds for a spread and a test, got {seeds}")
    from transferkit.strategies import check_recipe

    for strategy in sorted({MODES[mode] for mode in modes}):  # every mode, before the first run starts
        check_recipe(dataclasses.replace(recipe, strategy=strategy), own_backbone=backbone is not None)
    folder = Path(output or Path(recipe.output) / "compare")
    with folder_lock(folder):
        curves = _train_all(recipe, modes, seeds, folder, backbone, head, progress)
        summary = summarize(curves, seeds=[recipe.seed + i for i in range(seeds)])
        summary["recipe"] = recipe.to_dict()
        with disk_full_is_one_line(folder, then=", then run the comparison again (finished runs are reused)"):
            atomic_write_json(folder / "compare.json", summary)
            atomic_write_text(folder / "compare.md", to_markdown(summary))
            plot_comparison(curves, folder / "curves.png")
    log.info("compare: wrote %s\n%s", folder, to_markdown(summary))
    return summary


def _train_all(recipe: Recipe, modes: list[str], seeds: int, folder: Path, backbone, head, progress: bool) -> dict:
    """Each mode's histories, one per seed: finished runs read back, the others trained (an
    unfinished one resumed); each run is a run folder of its own under ``folder/runs``."""
    from transferkit.strategies.finetune import finetune, unfinished_run

    split_seed = recipe.seed if recipe.data.split_seed is None else recipe.data.split_seed
    curves: dict[str, list[dict]] = {mode: [] for mode in modes}
    for index in range(seeds):
        seed = recipe.seed + index
        for mode in modes:
            run_folder = folder / "runs" / f"{mode}-seed{seed}"
            log.info("compare: %s, seed %d (%d of %d)", mode, seed, index * len(modes) + modes.index(mode) + 1,
                     seeds * len(modes))
            history = _finished_history(run_folder)
            if history is None:
                run_recipe = dataclasses.replace(recipe, strategy=MODES[mode], seed=seed, output=str(run_folder),
                                                 data=dataclasses.replace(recipe.data, split_seed=split_seed))
                history = finetune(run_recipe, backbone=backbone, head=head, progress=progress,
                                   resume=unfinished_run(run_folder) is not None).history
            curves[mode].append(history)
    return curves


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


def _finished_history(run_folder: Path) -> dict | None:
    """The history of a finished run in ``run_folder``, or None (nothing there, or a newer run unfinished)."""
    import json

    from transferkit.strategies.finetune import unfinished_run

    summary = run_folder / "run.json"
    if not summary.is_file() or unfinished_run(run_folder) is not None:
        return None
    return json.loads(summary.read_text())["history"]


def _mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
