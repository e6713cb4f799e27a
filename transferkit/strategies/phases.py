"""The recipe's fine-tuning as the :class:`~transferkit.training.trainer.Trainer`'s plain arguments.

:func:`plan_phases` and :func:`training_settings` map the recipe's sections onto the Trainer's phases
and settings; :func:`train_phase` runs a phase and words what goes wrong in the recipe's keys: the
Trainer names its own arguments in an error (``unfreeze.fraction``), the user reads the recipe key
(``finetune.unfreeze.fraction``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

from transferkit.errors import DeviceMemoryError, RecipeError
from transferkit.recipe import Recipe
from transferkit.training.accelerator import out_of_memory
from transferkit.training.trainer import LossDiverged, Phase, Trainer, TrainingError, TrainingSettings

#: The Trainer's arguments that an error's key can start with, and the recipe keys they come from.
RECIPE_KEYS = {"unfreeze": "finetune.unfreeze", "schedule": "finetune.schedule", "layer_decay": "finetune.layer_decay",
               "early_stopping": "finetune.early_stopping", "imag_head": "head"}


def plan_phases(recipe: Recipe) -> list[Phase]:
    """The phases a recipe asks for, with their epoch ranges; empty phases are left out."""
    from transferkit.training.imag import episode_plan

    warmup = 0 if recipe.warmup.linear_probe else recipe.warmup.epochs
    phases = [Phase("warmup", 0, warmup, dataclasses.asdict(recipe.warmup.optimizer))] if warmup else []
    epochs, imag = recipe.finetune.epochs, recipe.imag
    episodes = (episode_plan(epochs, imag.normal_epochs, imag.imag_epochs) if recipe.strategy == "imag"
                else [("finetune", epochs)] if epochs else [])
    first, imag_count = warmup, 0
    for kind, length in episodes:
        imag_count += kind == "imag"
        phases.append(Phase(kind, first, first + length, dataclasses.asdict(recipe.finetune.optimizer),
                            episode=imag_count if kind == "imag" else 0))
        first += length
    return phases


def training_settings(recipe: Recipe, head=None) -> TrainingSettings:
    """The Trainer's settings from the recipe; ``head`` is a custom head function given to ``finetune``."""
    spec, unfreeze = recipe.finetune, recipe.finetune.unfreeze
    imag_head = {key: value for key, value in dataclasses.asdict(recipe.imag.head or recipe.head).items()
                 if key != "pooling"}  # the cut is pooled already
    if recipe.imag.head is None and head is not None:
        imag_head["custom"] = head  # one like the normal head: the custom head function called again
    return TrainingSettings(
        seed=recipe.seed, title=f"{recipe.name}: training", epochs=spec.epochs,
        unfreeze=dict(from_layer=unfreeze.from_layer, top_blocks=unfreeze.top_blocks, fraction=unfreeze.fraction,
                      everything=unfreeze.all, train_batchnorm=unfreeze.train_batchnorm,
                      batchnorm_momentum=unfreeze.batchnorm_momentum),
        schedule=dataclasses.asdict(spec.schedule),
        early_stopping=None if spec.early_stopping is None else dataclasses.asdict(spec.early_stopping),
        layer_decay=spec.layer_decay, label_smoothing=spec.label_smoothing, imag_train=recipe.imag.train,
        imag_head=imag_head, jit_compile=recipe.jit_compile,
        tensorboard_steps=recipe.log.tensorboard_steps if recipe.log.tensorboard else None)


def section(phase: Phase) -> str:
    """The recipe section that configures a phase."""
    return "warmup" if phase.name == "warmup" else "finetune"


@contextlib.contextmanager
def recipe_keys(phase: Phase):
    """Re-raises the Trainer's :class:`RecipeError` with the recipe key its argument comes from
    (``optimizer``: the phase's section's) in place of the argument."""
    try:
        yield
    except RecipeError as error:
        argument, rest = re.match(r"([^.\[]*)(.*)", error.key or "").groups()
        where = {**RECIPE_KEYS, "optimizer": f"{section(phase)}.optimizer"}.get(argument)
        if where is None:
            raise
        raise RecipeError(error.problem, key=where + rest) from None


def check_optimizers(trainer: Trainer, phases: list[Phase], steps: int) -> None:
    """Builds every phase's optimizer and schedule once, so that a bad setting fails before the
    first epoch rather than after the warm-up."""
    for phase in {phase.name: phase for phase in phases}.values():
        with recipe_keys(phase):
            trainer.build_optimizer(phase, steps)


def train_phase(trainer: Trainer, recipe: Recipe, phase: Phase, train, steps: int, verbose: int) -> None:
    """``trainer.run_phase``, with a diverged loss and the device out of memory told in the recipe's keys."""
    try:
        with recipe_keys(phase):
            trainer.run_phase(phase, train, steps, verbose)
    except LossDiverged as diverged:
        epoch = trainer.epoch
        again = f"continue after epoch {epoch} with --resume" if epoch else "run it again"
        raise TrainingError(
            f"the loss became {diverged.loss} in epoch {epoch + 1} ({phase.name}): lower "
            f"{section(phase)}.optimizer.learning_rate (now {phase.optimizer['learning_rate']}), add warm-up "
            f"epochs or use precision: float32, then {again}") from None
    except Exception as error:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
        if not out_of_memory(error):
            raise
        batch, epoch = recipe.data.batch_size, trainer.epoch
        again = f", then --resume (epoch {epoch} is saved)" if epoch else ""
        raise DeviceMemoryError(f"out of memory at data.batch_size {batch} ({phase.name}, "
                                f"{recipe.data.image_size or 'default'} px): lower it, e.g. --set "
                                f"data.batch_size={max(batch // 2, 1)}, or use precision: "
                                f"mixed_bfloat16{again}") from None
