"""The learning-rate finder (fastai's ``lr_find``) for a fine-tuning recipe.

:func:`lr_find` builds the model as :func:`~transferkit.strategies.finetune.finetune` does, warms its
head up as the recipe says (the linear probe, or the warm-up epochs), unfreezes what
``finetune.unfreeze`` says and sweeps the fine-tuning optimizer's learning rate (with the recipe's
layer decay, label smoothing, augmentation and MixUp/CutMix) exponentially from ``start`` to
``end``, one training batch per step (:mod:`transferkit.training.lr_find`). The model is thrown
away: the sweep is a probe. It writes into ``<output>/lr_find/`` (or ``output``):

    lr_find.json   the rates, the losses (smoothed and per step) and the suggestions
    lr_find.png    the loss against the rate, the suggestions marked

and, with ``write``, the recipe with ``finetune.optimizer.learning_rate`` set to the suggestion.

Example:
    >>> found = lr_find(load_recipe("recipes/flowers5_finetune.yaml"), write="flowers5_lr.yaml")
    >>> found.learning_rate, found.suggestions["steepest"]["learning_rate"]
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import tempfile
from pathlib import Path

from transferkit.errors import RecipeError, TransferkitError
from transferkit.io import atomic_write_json, atomic_write_text
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.recipe import Recipe, load_recipe
from transferkit.strategies import check_data, preflight
from transferkit.strategies.finetune import build_model, linear_probe, train_dataset
from transferkit.strategies.phases import plan_phases, recipe_keys, train_phase, training_settings
from transferkit.training.lr_find import Sweep, check_sweep, run_sweep, suggest_rates, sweep_schedule

log = logging.getLogger("transferkit")


@dataclasses.dataclass
class LRFind:
    """A learning-rate sweep on a recipe and the rates it suggests.

    Attributes:
        recipe: the recipe swept.
        sweep: what each step recorded (:class:`~transferkit.training.lr_find.Sweep`).
        suggestions: ``{"valley": {"learning_rate", "loss", "step"}, "steepest": {...}, "rise": {...}}``.
        suggest: the suggestion given (``valley``, ``steepest`` or ``rise``), ``learning_rate`` its rate.
        steps, start, end: the sweep as planned.
        folder: where ``lr_find.json`` and ``lr_find.png`` are; ``written``: the recipe written, if any.
    """
    recipe: Recipe
    sweep: Sweep
    suggestions: dict
    suggest: str
    steps: int
    start: float
    end: float
    folder: Path | None = None
    written: Path | None = None

    @property
    def learning_rate(self) -> float:
        """The suggested rate, to three significant digits."""
        return float(f"{self.suggestions[self.suggest]['learning_rate']:.3g}")

    def other_suggestions(self) -> str:
        """The suggestions not given, e.g. ``steepest 2.4e-06``."""
        return ", ".join(f"{name} {point['learning_rate']:.3g}" for name, point in self.suggestions.items()
                         if name != self.suggest)

    def to_dict(self) -> dict:
        finite = [[value if value == value and abs(value) != float("inf") else None for value in values]
                  for values in (self.sweep.raw_losses, self.sweep.losses)]
        return {"recipe": self.recipe.name, "steps": self.steps, "steps_taken": len(self.sweep.learning_rates),
                "start": self.start, "end": self.end, "stopped": self.sweep.stopped,
                "recipe_learning_rate": self.recipe.finetune.optimizer.learning_rate,
                "suggest": self.suggest, "learning_rate": self.learning_rate if self.suggestions else None,
                "suggestions": self.suggestions,
                "learning_rates": self.sweep.learning_rates, "raw_losses": finite[0], "losses": finite[1]}


def lr_find(recipe: Recipe | str | Path, *, steps: int = 100, start: float = 1e-7, end: float = 10.0,
            suggest: str = "auto", output: str | Path | None = None, write: str | Path | None = None,
            force: bool = False, head=None, progress: bool = True) -> LRFind:
    """Sweep a fine-tuning recipe's learning rate and suggest one (fastai's ``lr_find``).

    Args:
        recipe: a :class:`Recipe` (strategy ``finetune`` or ``imag``) or the path of a recipe file.
        steps: the planned steps (one training batch each), 10 or more.
        start, end: the first and the last step's learning rate, ``0 < start < end``.
        suggest: the suggestion to give: ``valley`` (fastai's), ``steepest``, ``rise`` (a third of the
            rate where the loss starts to climb), or ``auto``: ``rise`` when the head is trained before the
            sweep (linear probe or warm-up epochs), whose curve is flat until the rate gets too high,
            else ``valley`` (:func:`chosen_suggestion`).
        output: the folder for ``lr_find.json`` and ``lr_find.png``; default ``<recipe.output>/lr_find``.
        write: also write the recipe with ``finetune.optimizer.learning_rate`` set to the suggestion here.
        force: let ``write`` replace an existing file (without it, an existing file is an error).
        head: a custom head function, as :func:`~transferkit.strategies.finetune.finetune` takes it.
        progress: log a line every tenth of the sweep (and the warm-up's progress).

    Returns:
        The :class:`LRFind`; its ``learning_rate`` is the suggestion.

    Raises:
        TransferkitError: (before any slow work) an extract recipe, bad sweep arguments, ``write``
            onto an existing file without ``force``; the loss diverging before anything could be suggested.
    """
    log_to_stderr_unless_configured()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_lr_find(recipe, steps=steps, start=start, end=end, suggest=suggest, write=write, force=force)
    image_size = preflight(recipe)
    sweep = _sweep(recipe, image_size, steps, start, end, head, progress)
    found = LRFind(recipe, sweep, {}, chosen_suggestion(recipe, suggest), steps, start, end)
    folder = Path(output) if output else Path(recipe.output) / "lr_find"
    try:
        found.suggestions = suggest_rates(sweep.learning_rates, sweep.losses, steps)
    except TransferkitError as error:  # the curve is still worth a look
        raise TransferkitError(f"{error} (the curve: {_write_reports(found, folder) / 'lr_find.png'})") from None
    found.folder = _write_reports(found, folder)
    log.info("lr-find: suggested learning rate %g (%s; %s; the recipe's %g)", found.learning_rate, found.suggest,
             found.other_suggestions(), recipe.finetune.optimizer.learning_rate)
    if write is not None:
        found.written = write_lr_recipe(found, write)
    return found


def chosen_suggestion(recipe: Recipe, suggest: str = "auto") -> str:
    """The suggestion ``suggest`` names; ``auto``: ``rise`` when the recipe trains the head before
    fine-tuning (linear probe or warm-up epochs), ``valley`` when the sweep starts from a new head."""
    if suggest != "auto":
        return suggest
    return "rise" if recipe.warmup.linear_probe or recipe.warmup.epochs else "valley"


def check_lr_find(recipe: Recipe, *, steps: int, start: float, end: float, suggest: str = "auto",
                  write: str | Path | None = None, force: bool = False) -> None:
    """What :func:`lr_find` checks before any slow work: one line, exit code 2 on the command line."""
    if recipe.strategy == "extract":
        raise TransferkitError("lr-find is for fine-tuning: the recipe's strategy is extract, which trains no "
                               "network; use --set strategy=finetune to sweep its fine-tuning")
    if not recipe.finetune.epochs:
        raise RecipeError("is 0, so nothing is fine-tuned and there is no learning rate to find: set it, "
                          "e.g. --set finetune.epochs=10", key="finetune.epochs")
    check_sweep(start, end, steps, suggest)
    if write is not None:
        target = Path(write)
        if target.is_dir():
            raise TransferkitError(f"--write {target}: is a folder: give a recipe file, e.g. {target / 'lr.yaml'}")
        if target.exists() and not force:
            raise TransferkitError(f"--write {target}: the file exists: add --force to replace it, "
                                   "or write the recipe elsewhere")


def _sweep(recipe: Recipe, image_size: int, steps: int, start: float, end: float, head, progress: bool) -> Sweep:
    """The recipe's model, warmed up and unfrozen, swept from ``start`` to ``end``; then dropped."""
    import keras

    from transferkit.data.augment import build_augmentation
    from transferkit.data.pipelines import fitting_batch_size, steps_per_epoch
    from transferkit.training.accelerator import augment_placement, distribution, dtype_policy, resolve_precision
    from transferkit.training.checkpoints import Checkpoints
    from transferkit.training.trainer import Phase, Trainer

    splits = check_data(recipe, screen=True)
    batch_size = fitting_batch_size(recipe.data.batch_size, len(splits.train))
    precision = resolve_precision(recipe.precision)
    keras.utils.set_random_seed(recipe.seed)
    with distribution(recipe.distribute), dtype_policy(precision):
        model = build_model(recipe, len(splits.class_names), image_size, head=head)
    with RecipeError.under("data.augment"):
        augment = build_augmentation(recipe.data.augment, seed=recipe.seed)
    in_model = augment if augment_placement(recipe.data.augment_on) == "model" else None
    data = dict(images=splits.train, image_size=image_size, batch_size=batch_size, class_names=splits.class_names,
                augment=None if in_model is not None else augment)
    per_epoch = steps_per_epoch(len(splits.train), batch_size)
    with tempfile.TemporaryDirectory(prefix="transferkit-lr-find-") as scratch, distribution(recipe.distribute):
        new_trainer = functools.partial(Trainer, model=model, checkpoints=Checkpoints.of(Path(scratch)),
                                        folder=Path(scratch), val=None, state=None, precision=precision,
                                        augment=in_model)
        _warm_up(recipe, model, new_trainer, head, splits, data, per_epoch, progress)
        settings = dataclasses.replace(training_settings(recipe, head), epochs=steps,
                                       schedule=sweep_schedule(start, end, steps))
        # each step is an epoch of one batch to fit and to the schedule; the data: the epochs the steps take
        phase = Phase("finetune", 0, steps, {**dataclasses.asdict(recipe.finetune.optimizer), "learning_rate": start})
        with recipe_keys(phase):
            fitted = new_trainer(settings, phases=[phase]).prepare(phase, 1)
        log.info("lr-find: %d steps of one batch (%d images) from learning rate %.1e to %.1e", steps, batch_size,
                 start, end)
        batches = train_dataset(recipe, dataclasses.replace(phase, last=-(-steps // per_epoch)), **data)
        return run_sweep(fitted, batches, steps, progress)


def _warm_up(recipe: Recipe, model, new_trainer, head, splits, data: dict, per_epoch: int, progress: bool) -> None:
    """The head's warm-up as fine-tuning does it: the linear probe, or the warm-up epochs (if any)."""
    if recipe.warmup.linear_probe:
        linear_probe(recipe, model, splits, data["image_size"], progress)
        return
    for phase in plan_phases(recipe):
        if phase.name == "warmup":
            train_phase(new_trainer(training_settings(recipe, head), phases=[phase]), recipe, phase,
                        train_dataset(recipe, phase, **data), per_epoch,
                        verbose=1 if progress and sys.stderr.isatty() else 0)


def _write_reports(found: LRFind, folder: Path) -> Path:
    """``lr_find.json`` and ``lr_find.png`` into ``folder``."""
    from transferkit.reports.lr_find import plot_lr_find

    sweep = found.sweep
    atomic_write_json(folder / "lr_find.json", found.to_dict())
    plot_lr_find(sweep.learning_rates, sweep.losses, folder / "lr_find.png", raw_losses=sweep.raw_losses,
                 suggestions=found.suggestions, chosen=found.suggest,
                 title=f"{found.recipe.name}: loss by learning rate ({len(sweep.losses)} of {found.steps} steps)")
    log.info("lr-find: wrote %s and %s", folder / "lr_find.json", folder / "lr_find.png")
    return folder


def write_lr_recipe(found: LRFind, path: str | Path) -> Path:
    """Writes ``found.recipe`` (its ``--set`` overrides in, data paths absolute) to ``path`` with
    ``finetune.optimizer.learning_rate`` set to the suggestion, a comment on top saying so; named
    after the file, its output left to the default (``runs/<name>``) so it does not replace the
    original recipe's run. Returns ``path``."""
    import yaml

    path = Path(path)
    plain = {key: path.stem if key == "name" else value for key, value in found.recipe.to_dict().items()
             if key != "output"}
    before = plain["finetune"]["optimizer"]["learning_rate"]
    plain["finetune"]["optimizer"]["learning_rate"] = found.learning_rate
    header = (f"# transferkit lr-find: finetune.optimizer.learning_rate {found.learning_rate:g} is its "
              f"{found.suggest} suggestion ({found.other_suggestions()}; {found.recipe.name} had {before:g})\n"
              f"# the curve: {found.folder / 'lr_find.png'}\n")
    atomic_write_text(path, header + yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, width=100))
    log.info("lr-find: wrote %s (learning rate %g); run it with: transferkit finetune %s", path, found.learning_rate,
             path)
    return path
