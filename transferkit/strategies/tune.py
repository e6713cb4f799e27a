"""Hyper-parameter search over a recipe, on Optuna, within a time budget: `transferkit tune RECIPE`.

The search space is :mod:`transferkit.strategies.space`'s: each strategy's defaults around the
recipe, and the recipe's ``tune.space``. The first trial runs the recipe as it is (the prior; with
``strategy`` searched, one trial per strategy at the recipe's values), then Optuna's TPE sampler
proposes; a pruner stops fine-tuning trials whose validation error lags after an epoch or two.
Every trial is a run folder of its own (:mod:`transferkit.strategies.trials`). Trials are scored
on the validation split (``tune.metric``: log-loss by default, or top-1); a test split is held out
of every trial and evaluated once, on the winner, at the end.

The study lives in ``<folder>/study.db`` (SQLite, Optuna's RDB storage): after an interruption,
even ``kill -9``, ``resume=True`` carries on without redoing finished trials, and the interrupted
trial runs again (a fine-tuning one from its last epoch). ``optuna-dashboard sqlite:///<folder>/study.db``
shows it live. The budget is wall-clock time over all sessions: no trial starts that would end
after it (estimated from the trials so far), and a fine-tuning trial stops between epochs when the
next would overrun it.

Writes ``tune.json``, ``tune.md`` (leaderboard, best recipe, parameter importances), ``history.png``
and ``best.yaml`` (the winning recipe) to the study folder.

Example:
    >>> result = tune("recipes/flowers5_finetune.yaml", budget="30m")
    >>> result.best_recipe.finetune.optimizer.learning_rate, result.summary["best"]["val"]["top1"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.io import atomic_write_json, atomic_write_text, disk_full_is_one_line
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import folder_lock
from transferkit.recipe import Recipe, load_recipe, parse_duration
from transferkit.reports.tune import describe_values, leaderboard_rows, plot_history, to_markdown
from transferkit.strategies.space import centre, check_tune, strategies_of, suggest
from transferkit.strategies.trials import (
    TRIAL_ERRORS, BudgetSpent, EpochHook, Outcome, estimate_seconds, fitted_epochs, image_size_of,
    full_length, make_trial_recipe, planned_epochs, run_trial, shortened_note, trial_folder,
)

log = logging.getLogger("transferkit")

#: Stop sampling after this many plans in a row would overrun the budget.
MAX_SKIPS = 8
#: A fine-tuning plan is shortened to fit the budget (into this share of the time left), down to a quarter
#: of its fine-tuning epochs and at least 2; a plan that would need fewer is not run.
FIT_INTO = 0.9


@dataclasses.dataclass
class Tuning:
    """A finished search: its folder, the winning recipe, and the summary written to ``tune.json``."""
    folder: Path
    best_recipe: Recipe
    summary: dict


def tune(recipe: Recipe | str | Path, *, budget: str | float | None = None, trials: int | None = None,
         resume: bool = False, restart: bool = False, output: str | Path | None = None,
         progress: bool = False, prior: str = "the recipe's") -> Tuning:
    """Search the recipe's plans within ``budget`` and write the study's reports.

    Args:
        recipe: a :class:`Recipe` or a recipe file; its ``tune`` section sets the space and defaults.
        budget: wall-clock time for the search (``"25m"``, seconds); default ``tune.budget``.
        trials: at most this many trials; default ``tune.trials`` (None: as many as the budget allows).
        resume: go on with the study in the folder (finished trials are kept).
        restart: start a new study in the folder (finished trial runs are still reused).
        output: the study folder; default ``<recipe output>/tune``.
        progress: show each trial's own progress bars (one line per trial is always logged).
        prior: what the leaderboard calls the recipe's own plans (the first trials).

    Returns:
        A :class:`Tuning`.

    Raises:
        TransferkitError: a study already in the folder without resume/restart, or no trial finished.
        ResourceError: another search uses the folder, or the disk is full.
    """
    log_to_stderr_unless_configured()
    require_optuna()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    seconds = parse_duration(recipe.tune.budget if budget is None else budget, key="budget")
    space = check_tune(recipe)
    folder = Path(output or Path(recipe.output) / "tune")
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder), disk_full_is_one_line(folder, then=", then run the search again with --resume"):
        study = open_study(folder, recipe, space, resume=resume, restart=restart, prior=prior)
        search = _Search(study, recipe, space, folder, seconds, trials or recipe.tune.trials, progress)
        search.run()
        return _finish(study, recipe, space, folder, search)


def require_optuna() -> None:
    """Raises TransferkitError (one line, the fix) where Optuna is not installed."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise TransferkitError("searching plans needs Optuna: pip install 'transferkit[tune]' (or pip install optuna)")


def open_study(folder: Path, recipe: Recipe, space: dict, *, resume: bool, restart: bool, prior: str = "the recipe's"):
    """The Optuna study in ``folder/study.db``: a new one (its first trials the recipe's own plans), or
    the one there (with ``resume``), whose interrupted trials are queued to run again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    database = folder / "study.db"
    if restart:
        database.unlink(missing_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}", engine_kwargs={"connect_args": {"timeout": 60}})
    existing = optuna.get_all_study_names(storage)
    if existing and not resume:
        raise TransferkitError(f"{folder}: a search is already there ({database.name}): --resume to go on with it, "
                               f"or --restart to start again (finished trial runs are reused)")
    direction = "minimize" if recipe.tune.metric == "log_loss" else "maximize"
    asked = len(optuna.load_study(study_name=existing[0], storage=storage).trials) if existing else 0
    with warnings.catch_warnings():  # multivariate/group TPE are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # seeded by the recipe and the trials so far: a resumed search draws new plans, not the same ones again
        sampler = optuna.samplers.TPESampler(seed=recipe.seed + asked, multivariate=True, group=True)
    study = optuna.create_study(study_name=existing[0] if existing else recipe.name, storage=storage,
                                load_if_exists=True, direction=direction, sampler=sampler,
                                pruner=_pruner(recipe.tune.pruner, space, recipe))
    if study.user_attrs.get("metric", recipe.tune.metric) != recipe.tune.metric:
        raise TransferkitError(f"{folder}: the search there picks by {study.user_attrs['metric']}, not "
                               f"{recipe.tune.metric}: --set tune.metric={study.user_attrs['metric']}, or --restart")
    if not existing:
        study.set_user_attr("metric", recipe.tune.metric)
        for strategy in strategies_of(space, recipe):
            study.enqueue_trial(centre(recipe, space, strategy), user_attrs={"plan": f"{prior} ({strategy})"})
    _requeue_interrupted(study)
    return study


def _requeue_interrupted(study) -> None:
    """Trials left running by a killed search: marked failed, and queued again with the same values."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "resumes": trial.number})
        log.info("tune: trial %d was interrupted; it runs again", trial.number)


def _pruner(name: str, space: dict, recipe: Recipe):
    import optuna

    epochs = max([planned_epochs(recipe), int(space["finetune.epochs"].high) if "finetune.epochs" in space else 1])
    return {"hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 3),
                                                                 reduction_factor=3),
            "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "none": optuna.pruners.NopPruner}[name]()


class _Search:
    """The trial loop: ask, estimate, run or skip, tell, log one line; until the budget or trial count ends."""

    def __init__(self, study, recipe: Recipe, space: dict, folder: Path, budget: float, trials: int | None,
                 progress: bool):
        self.study, self.recipe, self.space, self.folder = study, recipe, space, folder
        self.budget, self.trials, self.progress = budget, trials, progress
        self.started = time.monotonic()
        self.spent_before = float(study.user_attrs.get("seconds_spent", 0.0))
        self.reserve = min(0.05 * budget, 120.0) if recipe.data.test is not None else 0.0  # for the winner's test
        self.deadline = self.started + budget - self.spent_before - self.reserve

    @property
    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def run(self) -> None:
        skips = 0
        while skips < MAX_SKIPS and time.monotonic() < self.deadline and not self._enough():
            trial = self.study.ask()
            fitted = self._fit(trial, suggest(trial, self.space, self.recipe.strategy))
            if fitted is None:
                skips += 1
                continue
            skips = 0
            values, plan = fitted
            output = trial_folder(self.folder, self.recipe, values)
            self._run(trial, values, dataclasses.replace(plan, output=str(output.resolve())), output)
        self.study.set_user_attr("seconds_spent", round(self.spent, 1))

    def _enough(self) -> bool:
        import optuna

        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return self.trials is not None and len(self.study.get_trials(deepcopy=False, states=done)) >= self.trials

    def _rows(self) -> list[dict]:
        return [dict(t.user_attrs) for t in self.study.get_trials(deepcopy=False) if "seconds" in t.user_attrs]

    def _fit(self, trial, values: dict) -> tuple[dict, Recipe] | None:
        """``values`` and their recipe, with fewer fine-tuning epochs where the plan would overrun the
        budget (see :data:`FIT_INTO`); None, and the trial told as not run, where no plan that short would fit."""
        plan, rows = make_trial_recipe(self.recipe, values, self.folder), self._rows()
        estimate, left = estimate_seconds(plan, rows), self.deadline - time.monotonic()
        if estimate is None or estimate <= left:
            return values, plan
        epochs = fitted_epochs(plan, rows, FIT_INTO * left) if plan.strategy != "extract" else None
        if epochs is not None and max(2, math.ceil(plan.finetune.epochs / 4)) <= epochs < plan.finetune.epochs:
            trial.set_user_attr("fitted", f"finetune.epochs {plan.finetune.epochs} -> {epochs} to fit the budget")
            trial.set_user_attr("planned_epochs", plan.finetune.epochs)
            return ({**values, "finetune.epochs": epochs},
                    dataclasses.replace(plan, finetune=dataclasses.replace(plan.finetune, epochs=epochs)))
        self._skip(trial, values, estimate)
        return None

    def _skip(self, trial, values: dict, estimate: float) -> None:
        import optuna

        left = max(self.deadline - time.monotonic(), 0)
        trial.set_user_attr("note", f"not run: about {estimate:.0f}s, {left:.0f}s of the budget left")
        trial.set_user_attr("strategy", values.get("strategy", self.recipe.strategy))
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.info("tune: trial %d not run: it would take about %.0fs, %.0fs left", trial.number, estimate, left)

    def _run(self, trial, values: dict, recipe: Recipe, output: Path) -> None:
        import optuna

        trial.set_user_attr("strategy", recipe.strategy)
        trial.set_user_attr("folder", str(output.relative_to(self.folder)))
        trial.set_user_attr("image_size", image_size_of(recipe))
        hook = EpochHook(trial, self.deadline, planned_epochs(recipe), self.study.direction.name == "MAXIMIZE")
        started = time.perf_counter()
        state = optuna.trial.TrialState.PRUNED
        log.info("tune: trial %d %s (%s) ...", trial.number, recipe.strategy, describe_values(values))
        try:
            with _trial_logging(self.progress):
                outcome = run_trial(recipe, output, hook, self.progress)
        except (optuna.TrialPruned, BudgetSpent, *TRIAL_ERRORS) as stopped:
            if isinstance(stopped, TRIAL_ERRORS):
                state = optuna.trial.TrialState.FAIL
            outcome = Outcome(None, time.perf_counter() - started, epochs=hook.done, note=str(stopped))
            if isinstance(stopped, BudgetSpent) and "refits" not in trial.user_attrs:  # again, shortened to fit
                self.study.enqueue_trial(trial.params, user_attrs={**_plan(trial), "refits": trial.number})
        attrs = {"seconds": round(outcome.seconds, 1), "epochs": outcome.epochs, "reused": outcome.reused,
                 "note": outcome.note, "epoch_seconds": [round(s, 2) for s in hook.seconds],
                 **_val_attrs(outcome.metrics)}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if outcome.metrics is not None:
            self.study.tell(trial, outcome.metrics["loss" if self.recipe.tune.metric == "log_loss" else "top1"])
        else:
            self.study.tell(trial, state=state)
        self.study.set_user_attr("seconds_spent", round(self.spent, 1))
        self._log(trial.number, outcome)

    def _log(self, number: int, outcome: Outcome) -> None:
        result = (f"val loss {outcome.metrics['loss']:.3f}, top-1 {outcome.metrics['top1']:.3f}, balanced accuracy "
                  f"{outcome.metrics['balanced_accuracy']:.3f}" if outcome.metrics else outcome.note)
        best = self.study.best_trial if _any_complete(self.study) else None
        left = max(self.deadline - time.monotonic(), 0)
        log.info("tune: trial %d (%.0fs%s): %s; best so far: trial %s; %.0fs of the budget left", number,
                 outcome.seconds, ", reused" if outcome.reused else "", result, best.number if best else "-", left)


def _plan(trial) -> dict:
    return {"plan": trial.user_attrs["plan"]} if "plan" in trial.user_attrs else {}


def _any_complete(study) -> bool:
    import optuna

    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


@contextlib.contextmanager
def _trial_logging(progress: bool):
    """Without ``progress`` a trial's own lines (epochs, reports) are held back: one line per trial shows."""
    logger = logging.getLogger("transferkit")
    level = logger.level
    if not progress:
        logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _val_attrs(metrics: dict | None) -> dict:
    keys = {"val_top1": "top1", "val_balanced_accuracy": "balanced_accuracy", "val_loss": "loss", "val_n": "n"}
    return {} if metrics is None else {attr: metrics[key] for attr, key in keys.items()}


def _finish(study, recipe: Recipe, space: dict, folder: Path, search: _Search) -> Tuning:
    """The winner (evaluated once on the test split, if there is one) and the reports."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise TransferkitError(f"no trial finished within the budget ({len(study.trials)} started): give the search "
                               f"more time (--budget), then --resume; the study is in {folder / 'study.db'}")
    best = study.best_trial
    best_folder = folder / best.user_attrs["folder"]
    best_recipe = full_length(load_recipe(best_folder / "recipe.yaml"), best.user_attrs, output=recipe.output)
    summary = {"name": recipe.name, "metric": recipe.tune.metric, "budget_seconds": search.budget,
               "seconds_spent": round(search.spent, 1), "space": {k: p.describe() for k, p in space.items()},
               "trials": leaderboard_rows(study.get_trials(deepcopy=False), study.direction.name == "MAXIMIZE"),
               "best": {"trial": best.number, "folder": str(best_folder), "plan": best.user_attrs.get("plan"),
                        "fitted": best.user_attrs.get("fitted"),
                        "shortened": shortened_note(best.user_attrs),
                        "val": {k: best.user_attrs.get(f"val_{k}") for k in ("top1", "balanced_accuracy", "loss", "n")},
                        "params": best.params},
               "test": _test_once(best_folder, recipe),
               "importances": _importances(study), "recipe": best_recipe.to_dict()}
    atomic_write_text(folder / "best.yaml", f"# the winner of {len(complete)} finished trials (tune.md)\n"
                      + "".join(f"# {line}\n" for line in summary["best"]["shortened"]) + best_recipe.to_yaml())
    atomic_write_json(folder / "tune.json", summary)
    atomic_write_text(folder / "tune.md", to_markdown(summary))
    plot_history(summary["trials"], folder / "history.png", maximize=study.direction.name == "MAXIMIZE",
                 title=f"{recipe.name}: validation {recipe.tune.metric.replace('_', '-')} per trial")
    log.info("tune: wrote %s\n%s", folder, to_markdown(summary, recipe_text=False))
    return Tuning(folder, best_recipe, summary)


def _test_once(best_folder: Path, recipe: Recipe) -> dict | None:
    """The winner's test metrics: evaluated the first time it wins (written to its run folder), read back after."""
    import json

    from transferkit.run import Run

    if recipe.data.test is None:
        return None
    report = best_folder / "test_metrics.json"
    if not report.is_file():
        Run.load(best_folder).evaluate()
    metrics = json.loads(report.read_text()) if report.is_file() else {}
    return {k: metrics.get(k) for k in ("n", "top1", "loss", "balanced_accuracy")}


def _importances(study) -> dict | None:
    """Optuna's parameter importances (fANOVA) over the finished trials; None with too few to tell."""
    import optuna

    try:
        return {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
