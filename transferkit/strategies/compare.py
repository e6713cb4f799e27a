"""Compare training modes (normal fine-tuning vs imag) over several seeds on the same split and budget.

Each (mode, seed) is an ordinary run folder under ``<output>/runs/``, so an interrupted comparison
picks up where it stopped: finished runs are read back, an unfinished one resumes. The summary
(:mod:`transferkit.reports.compare`: mean ± std per mode, paired differences with their 95% CI and
p-value) goes to ``compare.json``, ``compare.md`` and ``curves.png`` (mean validation and training
curves with a ±1 std band per mode, imag epochs shaded).

Example:
    >>> summary = compare("recipes/digits8_imag.yaml", modes=["normal", "imag"], seeds=3)
    >>> summary["differences"]["imag"]["best_top1"]["mean"]
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from transferkit.errors import RecipeError
from transferkit.io import atomic_write_json, atomic_write_text, disk_full_is_one_line
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import folder_lock
from transferkit.recipe import Recipe, load_recipe
from transferkit.reports.compare import plot_comparison, summarize, to_markdown
from transferkit.strategies import check_recipe
from transferkit.strategies import finetune as finetuning  # finetuning.finetune: looked up per run

log = logging.getLogger("transferkit")

MODES = {"normal": "finetune", "imag": "imag"}


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
    for strategy in sorted({MODES[mode] for mode in modes}):  # every mode, before the first run starts
        check_recipe(dataclasses.replace(recipe, strategy=strategy), own_backbone=backbone is not None)
    folder = Path(output or Path(recipe.output) / "compare")
    with folder_lock(folder):
        curves, val_metrics = _train_all(recipe, modes, seeds, folder, backbone, head, progress)
        summary = summarize(curves, seeds=[recipe.seed + i for i in range(seeds)], val_metrics=val_metrics)
        summary["recipe"] = recipe.to_dict()
        with disk_full_is_one_line(folder, then=", then run the comparison again (finished runs are reused)"):
            atomic_write_json(folder / "compare.json", summary)
            atomic_write_text(folder / "compare.md", to_markdown(summary))
            plot_comparison(curves, folder / "curves.png")
    log.info("compare: wrote %s\n%s", folder, to_markdown(summary))
    return summary


def _train_all(recipe: Recipe, modes: list[str], seeds: int, folder: Path, backbone, head,
               progress: bool) -> tuple[dict, dict]:
    """Each mode's histories and validation metrics, one per seed: finished runs read back, the others
    trained (an unfinished one resumed); each run is a run folder of its own under ``folder/runs``."""
    split_seed = recipe.seed if recipe.data.split_seed is None else recipe.data.split_seed
    curves: dict[str, list[dict]] = {mode: [] for mode in modes}
    val_metrics: dict[str, list[dict]] = {mode: [] for mode in modes}
    for index in range(seeds):
        seed = recipe.seed + index
        for mode in modes:
            run_folder = folder / "runs" / f"{mode}-seed{seed}"
            log.info("compare: %s, seed %d (%d of %d)", mode, seed, index * len(modes) + modes.index(mode) + 1,
                     seeds * len(modes))
            finished = finetuning.finished_run(run_folder)
            if finished is None:
                run_recipe = dataclasses.replace(recipe, strategy=MODES[mode], seed=seed, output=str(run_folder),
                                                 data=dataclasses.replace(recipe.data, split_seed=split_seed))
                run = finetuning.finetune(run_recipe, backbone=backbone, head=head, progress=progress,
                                          resume=finetuning.unfinished_run(run_folder) is not None)
                finished = {"history": run.history, "metrics": run.metrics}
            curves[mode].append(finished["history"])
            val_metrics[mode].append(finished.get("metrics", {}).get("val"))
    return curves, val_metrics
