"""One trial of a search: a recipe run in a run folder of its own, its time, and the epoch hook that
prunes a weak fine-tuning trial or stops one the budget cannot finish.

A trial's folder is named by a digest of its recipe, so the same plan asked for again (by the
sampler, or after ``--restart``) reads the finished run back instead of training it again, and an
interrupted fine-tuning trial resumes from its last epoch.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import statistics
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferkit.errors import DeviceMemoryError, RecipeError
from transferkit.training.trainer import TrainingError
from transferkit.recipe import Recipe, with_values
from transferkit.recipe import load_recipe

log = logging.getLogger("transferkit")

#: A plan that fails this way is a result of the search (that plan does not work), not its end.
TRIAL_ERRORS = (TrainingError, DeviceMemoryError, RecipeError)


class BudgetSpent(Exception):
    """Raised from the epoch hook: the next epoch would end after the search's deadline."""


@dataclass
class Outcome:
    """What a trial gave: the validation metrics (None unless finished), its seconds and epochs, and a note."""
    metrics: dict | None
    seconds: float
    epochs: int = 0
    reused: bool = False
    note: str = ""


def trial_folder(folder: Path, recipe: Recipe, values: dict) -> Path:
    """``folder/trials/<strategy>-<digest>``: the digest is of the trial's recipe, its output left out."""
    plain = with_values(recipe.to_dict(), values)
    plain.pop("output", None)
    digest = hashlib.sha256(yaml.safe_dump(plain, sort_keys=True).encode()).hexdigest()[:10]
    return folder / "trials" / f"{plain['strategy']}-{digest}"


def make_trial_recipe(recipe: Recipe, values: dict, output: Path) -> Recipe:
    """``recipe`` with a trial's ``values`` set, written to ``output``."""
    return load_recipe(with_values(recipe.to_dict(), {**values, "output": str(output)}))


def finished_metrics(folder: Path) -> dict | None:
    """The validation metrics and epochs of a finished run in ``folder`` (None: none, or one unfinished)."""
    from transferkit.strategies.finetune import finished_run

    summary = finished_run(folder)
    if summary is None:
        return None
    return {"val": summary.get("metrics", {}).get("val"), "epochs": len(summary.get("history", {}).get("phase", []))}


def run_trial(recipe: Recipe, folder: Path, epoch_hook, progress: bool) -> Outcome:
    """Run (or read back) one trial's recipe into ``folder``; the test split stays held out.

    Raises:
        optuna.TrialPruned, BudgetSpent: from ``epoch_hook`` (fine-tuning only); the unfinished run is removed.
        TRIAL_ERRORS: the plan failed (a diverged loss, out of memory, settings that do not combine).
    """
    started = time.perf_counter()
    finished = finished_metrics(folder)
    if finished is not None:
        return Outcome(finished["val"], 0.0, finished["epochs"], reused=True, note="reused a finished run")
    if recipe.strategy == "extract":
        import keras

        from transferkit.strategies.extract import extract

        try:
            run = extract(recipe, progress=progress, evaluate_test=False)
        finally:
            keras.backend.clear_session()  # one process runs every trial: each one's models go
        return Outcome(run.metrics["val"], time.perf_counter() - started)
    return _finetune_trial(recipe, folder, epoch_hook, progress, started)


def _finetune_trial(recipe: Recipe, folder: Path, epoch_hook, progress: bool, started: float) -> Outcome:
    import keras
    import optuna

    from transferkit.strategies import finetune as finetuning

    try:
        run = finetuning.finetune(recipe, progress=progress, resume=finetuning.unfinished_run(folder) is not None,
                                  callbacks=[epoch_hook.callback()], evaluate_test=False)
    except (optuna.TrialPruned, BudgetSpent):  # stopped for good: its checkpoints go (an error keeps them)
        shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
        raise
    finally:
        keras.backend.clear_session()
    return Outcome(run.metrics["val"], time.perf_counter() - started, epochs=len(run.history.get("phase", [])))


def planned_epochs(recipe: Recipe) -> int:
    """The epochs a fine-tuning trial trains at most (warm-up epochs too, unless LP-FT replaces them)."""
    warmup = 0 if recipe.warmup.linear_probe else recipe.warmup.epochs
    return warmup + recipe.finetune.epochs


def estimate_seconds(recipe: Recipe, earlier: list[dict]) -> float | None:
    """How long ``recipe``'s trial will take, from ``earlier`` trials' rows (``strategy``, ``seconds``,
    ``epoch_seconds``, ``epochs``, ``image_size``): None before a trial of its kind has run.

    Extraction: the median of earlier extraction trials. Fine-tuning: the slowest epoch per input
    pixel seen so far times this trial's epochs and pixels, plus the median time outside epochs
    (building the model, LP-FT's features, the reports).
    """
    per_epoch = epoch_seconds(recipe, earlier)
    if recipe.strategy == "extract":
        times = [row["seconds"] for row in _timed(earlier) if row["strategy"] == "extract"]
        return statistics.median(times) if times else None
    if per_epoch is None:
        return None
    overheads = [row["seconds"] - sum(row["epoch_seconds"]) for row in _timed(earlier)
                 if row["strategy"] != "extract" and row.get("epoch_seconds")]
    return max(statistics.median(overheads), 0.0) + per_epoch * planned_epochs(recipe)


def epoch_seconds(recipe: Recipe, earlier: list[dict]) -> float | None:
    """The time of one of ``recipe``'s fine-tuning epochs, scaled from the slowest per-pixel epoch so far."""
    rates = [max(row["epoch_seconds"]) / row["image_size"] ** 2 for row in _timed(earlier)
             if row["strategy"] != "extract" and row.get("epoch_seconds")]
    return max(rates) * image_size_of(recipe) ** 2 if rates else None


def _timed(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("seconds") and not row.get("reused")]


def fitted_epochs(recipe: Recipe, earlier: list[dict], seconds_left: float) -> int | None:
    """The most fine-tuning epochs of ``recipe`` that fit in ``seconds_left`` (None: its time is not known yet)."""
    per_epoch, whole = epoch_seconds(recipe, earlier), estimate_seconds(recipe, earlier)
    if per_epoch is None or whole is None:
        return None
    return max(int((seconds_left - (whole - per_epoch * recipe.finetune.epochs)) // per_epoch), 0)


def image_size_of(recipe: Recipe) -> int:
    from transferkit.models.registry import get_backbone_info

    return recipe.data.image_size or get_backbone_info(recipe.backbone.name).default_size


class EpochHook:
    """Around each fine-tuning epoch: time it, report the validation error to the Optuna trial (its
    pruner decides), and stop the trial when the next epoch would end after ``deadline`` (a monotonic
    time), or as soon as the epochs it has left would, even at the fastest pace of its current phase
    (warm-up epochs are faster than fine-tuning ones): a plan the budget cannot finish costs an epoch
    or two, not the budget.

    Validation error (1 - top-1), not the validation loss, is reported: label smoothing and MixUp,
    which trials vary, change the loss but not the error.
    """

    def __init__(self, trial, deadline: float, epochs: int, maximize: bool):
        self.trial, self.deadline, self.epochs, self.maximize = trial, deadline, epochs, maximize
        self.started = time.monotonic()
        self.seconds: list[float] = []  # each finished epoch's
        self.phase_seconds: list[float] = []  # those of the current phase (one ``fit``): warm-up epochs are faster

    @property
    def done(self) -> int:
        return len(self.seconds)

    def callback(self):
        """The hook as a Keras callback."""
        import keras

        return keras.callbacks.LambdaCallback(on_train_begin=self.new_phase, on_epoch_begin=self.begin,
                                              on_epoch_end=self)

    def new_phase(self, logs: dict | None = None) -> None:
        self.phase_seconds = []

    def begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.monotonic()

    def __call__(self, epoch: int, logs: dict | None = None) -> None:
        import optuna

        logs = logs or {}
        now = time.monotonic()
        self.seconds.append(now - self.started)
        self.phase_seconds.append(self.seconds[-1])
        accuracy = logs.get("val_accuracy")
        if accuracy is not None:
            self.trial.report(accuracy if self.maximize else 1.0 - accuracy, epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: val top-1 {accuracy:.3f}")
        left = self.epochs - (epoch + 1)
        pace = min(self.phase_seconds)
        if left > 0 and (now + self.seconds[-1] > self.deadline or now + left * pace > self.deadline):
            raise BudgetSpent(f"stopped after epoch {epoch + 1} of {self.epochs}: the other {left} would take about "
                              f"{left * pace:.0f}s or more, {max(self.deadline - now, 0):.0f}s of the budget left")


def full_length(recipe: Recipe, attrs: dict, **changes) -> Recipe:
    """The winner (with ``changes``) at its planned fine-tuning epochs where the search ran it shorter to
    fit the budget: the trial is evidence for the plan, and the plan is what a user runs next."""
    recipe, epochs = dataclasses.replace(recipe, **changes), attrs.get("planned_epochs")
    if epochs is None:
        return recipe
    return dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, epochs=epochs))


def shortened_note(attrs: dict) -> list[str]:
    """What the winning recipe's header says where its trial ran fewer epochs than the recipe does."""
    if not attrs.get("planned_epochs"):
        return []
    return [f"the search ran this plan for fewer fine-tuning epochs to fit its budget ({attrs['fitted']});",
            f"this recipe runs all {attrs['planned_epochs']} (its validation figures come from the shorter run)"]
