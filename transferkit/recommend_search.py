"""`transferkit recommend --budget`: evidence over rules. :func:`recommend_by_search` measures the data as
:func:`transferkit.recommend.recommend` does, then searches the table's answer against the other strategy
on the data within a time budget (:func:`transferkit.strategies.tune.tune`); the plan that wins on the
validation split is the one :func:`write_searched_recipe` writes, headed by the evidence.

Example:
    >>> rec, tuning = recommend_by_search("photos/", "25m", overrides=["data.test=0.2"])
    >>> tuning.best_recipe.strategy, tuning.summary["test"]["top1"]
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from transferkit.errors import TransferkitError
from transferkit.io import atomic_write_text
from transferkit.recommend import Recommendation, images_to_measure, recipe_data_path, recommend, table_settings


def recommend_by_search(data: str, budget: str | float, *, size=None, similar=None, backbone: str = "mobilenet_v2",
                        alpha: float | None = None, name: str | None = None, overrides=(), resume: bool = False,
                        restart: bool = False, progress: bool = False):
    """The table's answer for ``data``, then the plan that wins a search on it.

    Args:
        data: a class-per-folder dataset or labels CSV.
        budget: wall-clock time for all of it, the measurement included (``"25m"`` or seconds).
        size, similar, backbone, alpha: as :func:`transferkit.recommend.recommend` takes them.
        name: the searched recipe's name (runs go to ``runs/<name>/tune``); default: ``data``'s name.
        overrides: ``KEY=VALUE`` settings of the searched recipe, e.g. ``data.test=0.2`` (a test split
            is then left out of the measurement too, and evaluated once, on the winner).
        resume: go on with an interrupted search; restart: start it again (finished trials are reused).
        progress: show each trial's progress bars (one line per trial is always logged).

    Returns:
        ``(Recommendation, Tuning)``: the winner is ``tuning.best_recipe``.

    Raises:
        TransferkitError: one line, before anything is measured: a bad budget or override, resume with
            restart, no Optuna; after the measurement, a searched recipe that cannot run.
    """
    from transferkit.recipe import parse_duration
    from transferkit.strategies import check_recipe
    from transferkit.strategies.tune import require_optuna, tune

    started, seconds = time.monotonic(), parse_duration(budget, key="budget")
    if resume and restart:
        raise TransferkitError("give resume or restart, not both")
    require_optuna()
    measure_on = images_to_measure(data, overrides)
    rec = recommend(size=size, similar=similar, data=data, backbone=backbone, alpha=alpha, measure_on=measure_on)
    left = max(seconds - (time.monotonic() - started), 1.0)
    recipe = search_recipe(rec, data, name=name or Path(data).name, budget=left, overrides=overrides)
    check_recipe(recipe)
    return rec, tune(recipe, budget=left, resume=resume, restart=restart, progress=progress, prior="the table's")


def search_recipe(rec: Recommendation, data: str, *, name: str, budget, overrides=()):
    """The recipe `recommend --budget` searches: the table's answer (``strategy`` and its settings) plus
    the table's settings for the other strategy, with ``strategy`` searched between the two. Returns
    a loaded :class:`~transferkit.recipe.Recipe`; ``overrides`` as ``--set`` (e.g. ``data.test=0.2``)."""
    from transferkit.recipe import load_recipe

    other = "finetune" if rec.strategy == "extract" else "extract"
    plain = rec.recipe(data=recipe_data_path(data), name=name, backbone=rec.backbone)
    other_cell = table_settings("large" if other == "finetune" else "small", rec.similar, rec.backbone)
    if other == "extract" and rec.measurement:  # the measured cut point, as a recipe writes it
        best, layers = rec.measurement["best_layer"], rec.measurement["layers"]
        other_cell["extract"]["layer"] = "top" if best == layers[-1] else best
    plain.update(other_cell)
    plain["data"].setdefault("augment", ["random_flip"])
    plain["tune"] = {"budget": budget, "space": {"strategy": [rec.strategy, other]}}
    return load_recipe(plain, overrides=overrides)


def write_searched_recipe(path: str | Path, tuning, rec: Recommendation) -> None:
    """Write the search's winning recipe headed by the evidence: the table's answer and the leaderboard."""
    summary, test = tuning.summary, tuning.summary.get("test")
    rows = [row for row in summary["trials"] if row["state"] == "complete"][:5]
    tried = [row for row in summary["trials"] if not row["note"].startswith("not run")]
    header = [f"# transferkit recipe: the best of {len(tried)} plans tried in "
              f"{summary['seconds_spent'] / 60:.1f} min, picked by validation {summary['metric'].replace('_', '-')}",
              f"# the table said: {rec.strategy} ({rec.summary})",
              *(f"# - trial {row['trial']} {row['strategy']}: val top-1 {row['val_top1']:.3f}, loss "
                f"{row['val_loss']:.3f}, {row['seconds']:.0f}s" for row in rows),
              *([f"# test split, evaluated once on the winner: top-1 {test['top1']:.3f} (n={test['n']})"]
                if test else []),
              *(f"# {line}" for line in summary["best"].get("shortened", [])),
              f"# the study and every trial's run folder: {tuning.folder}"]
    plain = {key: Path(path).stem if key == "name" else value
             for key, value in tuning.best_recipe.to_dict().items() if key not in ("output", "tune")}
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(plain, sort_keys=False))
