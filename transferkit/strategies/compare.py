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
import os
from pathlib import Path

from transferkit.errors import RecipeError
from transferkit.io import atomic_write_json, atomic_write_text, disk_full_is_one_line
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import folder_lock
from transferkit.recipe import Recipe, load_recipe
from transferkit.reports.compare import plot_comparison, summarize, to_markdown
from transferkit.strategies import check_recipe
from transferkit.strategies import finetune as finetuning
from transferkit.strategies.tracking import flat_recipe  # finetuning.finetune: looked up per run

log = logging.getLogger("transferkit")

#: The modes every comparison knows; any other name is a configuration whose ``strategy`` its settings give.
MODES = {"normal": "finetune", "imag": "imag"}


def compare(recipe: Recipe | str | Path, modes=("normal", "imag"), seeds: int = 3, *, settings=None, jobs: int = 1,
            backbone=None, head=None, output: str | Path | None = None, progress: bool = False) -> dict:
    """Train every mode with ``seeds`` seeds and write the comparison.

    Args:
        recipe: the recipe (its ``imag`` section configures imag mode); ``strategy`` is set per mode.
        modes: two or more names: ``normal`` (strategy finetune), ``imag``, or names of your own
            whose ``settings`` give their strategy, e.g. ``{"imag_head": ["strategy=imag", "imag.train=head"]}``.
        seeds: seeds per mode: the recipe's seed, +1, +2, ...; the split stays the recipe's.
        settings: mode -> ``key=value`` overrides (as ``--set``) for that mode's runs only.
        jobs: runs trained at once, each in a process of its own (0: one per two CPU cores).
        backbone, head: as for :func:`transferkit.strategies.finetune.finetune` (give a backbone
            as a function so that each run starts from fresh weights; with them, ``jobs`` is 1).
        output: the comparison folder; default ``<recipe output>/compare``.
        progress: show Keras' progress bars.

    Returns:
        The summary written to ``compare.json``.

    Raises:
        RecipeError: a bad mode, setting or seed count, or a mode's recipe that would fail (checked
            for every mode before the first run starts).
        ResourceError: another comparison uses the folder, or the disk is full.
    """
    log_to_stderr_unless_configured()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if seeds < 2:
        raise RecipeError(f"compare: needs at least 2 seeds for a spread and a test, got {seeds}")
    recipes = mode_recipes(recipe, list(modes), settings or {})
    for mode_recipe in recipes.values():  # every mode, before the first run starts
        check_recipe(mode_recipe, own_backbone=backbone is not None)
    jobs = max(1, (os.cpu_count() or 2) // 2) if jobs == 0 else jobs
    if jobs > 1 and (backbone is not None or head is not None):
        raise RecipeError("compare: a backbone or head given as Python objects trains in this process: jobs=1")
    folder = Path(output or Path(recipe.output) / "compare")
    with folder_lock(folder):
        curves, val_metrics = _train_all(recipes, seeds, folder, backbone, head, progress, jobs)
        summary = summarize(curves, seeds=[recipe.seed + i for i in range(seeds)], val_metrics=val_metrics)
        summary["recipe"] = recipe.to_dict()
        summary["settings"] = {mode: list((settings or {}).get(mode, ())) for mode in recipes}
        with disk_full_is_one_line(folder, then=", then run the comparison again (finished runs are reused)"):
            atomic_write_json(folder / "compare.json", summary)
            atomic_write_text(folder / "compare.md", to_markdown(summary))
            plot_comparison(curves, folder / "curves.png")
    log.info("compare: wrote %s\n%s", folder, to_markdown(summary))
    return summary


def mode_recipes(recipe: Recipe, modes: list[str], settings: dict[str, list[str]]) -> dict[str, Recipe]:
    """Each mode's recipe: ``recipe`` with the mode's strategy and its ``settings`` on top.

    Raises:
        RecipeError: fewer than two distinct modes, a setting for a mode not compared, a mode of
            your own without a strategy, or a bad setting (keyed ``--set-per-mode MODE``).
    """
    if len(modes) < 2 or len(set(modes)) != len(modes) or not all(isinstance(m, str) and m for m in modes):
        raise RecipeError(f"compare: modes must be two or more distinct names, got {','.join(map(str, modes))}")
    stray = sorted(set(settings) - set(modes))
    if stray:
        raise RecipeError(f"compare: settings for {', '.join(stray)}, which is not among the modes "
                          f"{','.join(modes)}: add it to --modes")
    recipes = {}
    for mode in modes:
        given = [f"strategy={MODES[mode]}"] if mode in MODES else []
        with RecipeError.under(f"--set-per-mode {mode}"):
            recipes[mode] = load_recipe(recipe.to_dict(), overrides=given + list(settings.get(mode, ())))
        if mode not in MODES and not any(str(item).startswith("strategy=") for item in settings.get(mode, ())):
            raise RecipeError(f"compare: mode {mode!r} is not one of {', '.join(MODES)}: give its strategy, "
                              f"e.g. --set-per-mode {mode}:strategy=imag")
        if recipes[mode].strategy == "extract":
            raise RecipeError(f"compare: mode {mode!r} would extract features; compare trains finetune or imag runs")
    return recipes


def _train_all(recipes: dict[str, Recipe], seeds: int, folder: Path, backbone, head, progress: bool,
               jobs: int) -> tuple[dict, dict]:
    """Each mode's histories and validation metrics, one per seed: finished runs read back, the others
    trained (an unfinished one resumed), ``jobs`` at a time; each run is a run folder of its own under
    ``folder/runs``."""
    tasks = [(mode, index) for index in range(seeds) for mode in recipes]
    results: dict[tuple[str, int], dict] = {}
    pending = []
    for number, (mode, index) in enumerate(tasks, start=1):
        run_recipe = _run_recipe(recipes[mode], mode, index, folder / "runs")
        finished = finetuning.finished_run(Path(run_recipe.output))
        if finished is not None:
            _same_recipe(run_recipe, Path(run_recipe.output))
            results[mode, index] = finished
        else:
            pending.append((number, mode, index, run_recipe))
    if jobs == 1 or len(pending) < 2:
        for number, mode, index, run_recipe in pending:
            log.info("compare: %s, seed %d (%d of %d)", mode, run_recipe.seed, number, len(tasks))
            results[mode, index] = _train_one(run_recipe, backbone, head, progress)
    else:
        results |= _train_in_processes(pending, len(tasks), jobs, progress)
    curves = {mode: [results[mode, i]["history"] for i in range(seeds)] for mode in recipes}
    val_metrics = {mode: [results[mode, i].get("metrics", {}).get("val") for i in range(seeds)] for mode in recipes}
    return curves, val_metrics


def _same_recipe(recipe: Recipe, folder: Path) -> None:
    """Raises RecipeError where the finished run in ``folder`` was trained with another recipe than ``recipe``
    (reading it back would compare results of a recipe that is no longer asked for)."""
    before, now = flat_recipe(load_recipe(folder / "recipe.yaml")), flat_recipe(recipe)
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    if changed:
        key = changed[0]
        raise RecipeError(f"compare: {folder} was trained with another recipe ({key}: {before.get(key)!r}, now "
                          f"{now.get(key)!r}): compare into another --output, or delete that folder")


def _run_recipe(recipe: Recipe, mode: str, index: int, runs: Path) -> Recipe:
    """The recipe of one run: seed ``recipe.seed + index`` on the recipe's own split, in ``runs/<mode>-seed<seed>``."""
    split_seed = recipe.seed if recipe.data.split_seed is None else recipe.data.split_seed
    seed = recipe.seed + index
    return dataclasses.replace(recipe, seed=seed, output=str(runs / f"{mode}-seed{seed}"),
                               data=dataclasses.replace(recipe.data, split_seed=split_seed))


def _train_one(recipe: Recipe, backbone=None, head=None, progress: bool = False) -> dict:
    """Train (or resume) one run; its history and metrics."""
    run = finetuning.finetune(recipe, backbone=backbone, head=head, progress=progress,
                              resume=finetuning.unfinished_run(recipe.output) is not None)
    return {"history": run.history, "metrics": run.metrics}


def _train_plain(plain: dict, progress: bool) -> dict:
    """:func:`_train_one` in a worker process, from the recipe as plain data."""
    return _train_one(load_recipe(plain), progress=progress)


def _train_in_processes(pending: list, total: int, jobs: int, progress: bool) -> dict:
    """Train the ``pending`` runs ``jobs`` at a time, each in a fresh (spawned) process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_plain, run_recipe.to_dict(), progress): (mode, index)
                   for _, mode, index, run_recipe in pending}
        log.info("compare: training %d of %d runs, %d at a time", len(pending), total, jobs)
        for done, future in enumerate(as_completed(futures), start=1):
            mode, index = futures[future]
            results[mode, index] = future.result()
            log.info("compare: %s, seed index %d done (%d of %d)", mode, index, done, len(pending))
    return results
