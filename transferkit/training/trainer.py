"""The fine-tuning loop: phases of Keras ``fit`` over one shared epoch count.

A :class:`Trainer` runs the :class:`Phase` list it is given (warm-up, fine-tuning, imag episodes;
planned by :mod:`transferkit.strategies.finetune`), each with its own trainable layers, optimizer and
epoch range. Each phase's ``fit`` gets the Keras callbacks of :mod:`transferkit.training.callbacks`,
one per concern, in the order their effects must come at the end of an epoch: the epoch is recorded
in the :class:`TrainingRecord`, judged by early stopping, checkpointed
(:mod:`transferkit.training.checkpoints`) and written to the monitor files. Every random draw of an
epoch is reseeded from the recipe's seed and the epoch (and batch) alone, so that a resumed run ends
with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import DeviceMemoryError, RecipeError, TransferkitError
from transferkit.recipe import OptimizerSpec, Recipe
from transferkit.training.accelerator import dtype_policy, out_of_memory
from transferkit.training.checkpoints import Checkpoints

log = logging.getLogger("transferkit")


class TrainingError(TransferkitError):
    """Training cannot go on (the loss diverged, an unfinished run is in the way)."""


@dataclass
class Phase:
    """A stretch of training with one trainable set and one optimizer."""
    name: str       # "warmup", "finetune" or "imag"
    first: int      # epochs done before it starts
    last: int       # epochs done when it ends
    optimizer: OptimizerSpec
    episode: int = 0  # imag episodes: 1, 2, ... (seeds the fresh head and the label permutation)


def episode_seed(seed: int, episode: int) -> int:
    """The seed of imag episode ``episode``'s label permutation and fresh head (any recipe seed fits)."""
    return (seed * 1000 + episode) % 2**32


def with_augmentation(model, augment):
    """``model`` behind ``augment``: the layers act in training only, ``model`` keeps its weights."""
    import keras

    inputs = keras.Input(model.input.shape[1:], name="pixels")
    return keras.Model(inputs, model(augment(inputs)), name=f"{model.name}_augmented")


def get_head_weights(model) -> list[np.ndarray]:
    """The weights of every head layer (`transferkit.models.heads.head_layers`), as one flat list of copies."""
    from transferkit.models.heads import head_layers

    return [np.array(weight) for layer in head_layers(model) for weight in layer.get_weights()]


def set_head_weights(model, weights: list[np.ndarray]) -> None:
    """Puts weights from `get_head_weights` back, exactly."""
    from transferkit.models.heads import head_layers

    start = 0
    for layer in head_layers(model):
        count = len(layer.get_weights())
        layer.set_weights(weights[start:start + count])
        start += count


class TrainingRecord:
    """What a run has trained so far, checkpointed with every epoch (from ``state``, a checkpoint's
    state, when resuming): ``epoch`` (the epochs done), ``history`` (per key one value per epoch,
    None where an epoch did not log it), ``phases`` (each epoch's phase) and ``seconds``; ``last``
    and ``last_seconds`` are the latest epoch's logs and time."""

    def __init__(self, state: dict):
        self.epoch: int = state.get("epoch", 0)
        self.history: dict[str, list] = state.get("history", {})
        self.phases: list[str] = state.get("phases", [])
        self.seconds: float = state.get("seconds", 0.0)
        self.last: dict = {}
        self.last_seconds = 0.0

    def add(self, phase: str, logs: dict, seconds: float) -> None:
        """Records one more epoch of ``phase`` with its ``logs``, which took ``seconds``."""
        self.epoch += 1
        for key in set(self.history) | set(logs):
            self.history.setdefault(key, [None] * len(self.phases)).append(logs.get(key))
        self.phases.append(phase)
        self.seconds += seconds
        self.last, self.last_seconds = logs, seconds


def _section(phase: Phase) -> str:
    """The recipe section that configures a phase."""
    return "warmup" if phase.name == "warmup" else "finetune"


class Trainer:
    """Runs the phases and keeps the shared epoch count, history, early stopping and checkpoints."""

    def __init__(self, recipe: Recipe, model, checkpoints: Checkpoints, folder: Path, phases: list[Phase], val,
                 state, head=None, precision: str = "float32", augment=None, plot_history=None):
        state = state or {}
        self.recipe, self.model, self.checkpoints, self.folder, self.val = recipe, model, checkpoints, folder, val
        self.head, self.precision, self.augment = head, precision, augment  # augment: in-model augmentation
        self.plot_history = plot_history  # draws curves.png: plot_history(curves, path, phases=..., title=...)
        self.phases_planned, self.total = phases, phases[-1].last if phases else 0
        # the fine-tuning schedule runs over all finetune and imag episodes together
        self.budget_first = next((phase.first for phase in phases if phase.name != "warmup"), 0)
        self.trained = model  # the model being trained: ``model``, or in an imag episode the imag model
        self.optimizer = None  # the current phase's
        self.jit_compile = False
        self.record = TrainingRecord(state)
        # early stopping's state (checkpointed): ``best``, ``best_epoch``, ``wait``, ``stopped``
        self.early_stopping: dict = state.get("early_stopping", {})
        self.parameters: dict = state.get("parameters", {})
        self.num_classes = model.output.shape[-1]

    @property
    def epoch(self) -> int:
        return self.record.epoch

    @property
    def history(self) -> dict[str, list]:
        return self.record.history

    @property
    def phases(self) -> list[str]:
        return self.record.phases

    @property
    def seconds(self) -> float:
        return self.record.seconds

    @property
    def stopped(self) -> bool:
        return bool(self.early_stopping.get("stopped"))

    def check_optimizers(self, steps: int) -> None:
        """Build every phase's optimizer and schedule once, so that a bad setting fails before
        the first epoch rather than after the warm-up."""
        for phase in {phase.name: phase for phase in self.phases_planned}.values():
            self._optimizer(phase, steps)

    def run_phase(self, phase: Phase, train, steps: int, verbose: int) -> None:
        from transferkit.training.callbacks import LossDiverged

        fitted = self._prepare(phase, steps)
        callbacks = self.callbacks(phase)
        try:
            with RecipeError.under("finetune.early_stopping"):  # its monitor: the one key checked inside fit
                fitted.fit(train, validation_data=None if phase.name == "imag" else self.val, epochs=phase.last,
                           initial_epoch=self.epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
                           shuffle=False)
        except LossDiverged as diverged:
            again = f"continue after epoch {self.epoch} with --resume" if self.epoch else "run it again"
            raise TrainingError(
                f"the loss became {diverged.loss} in epoch {self.epoch + 1} ({phase.name}): lower "
                f"{_section(phase)}.optimizer.learning_rate (now {phase.optimizer.learning_rate}), add warm-up "
                f"epochs or use precision: float32, then {again}") from None
        except Exception as error:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
            if not out_of_memory(error):
                raise
            batch = self.recipe.data.batch_size
            again = f", then --resume (epoch {self.epoch} is saved)" if self.epoch else ""
            raise DeviceMemoryError(f"out of memory at data.batch_size {batch} ({phase.name}, "
                                    f"{self.recipe.data.image_size or 'default'} px): lower it, e.g. --set "
                                    f"data.batch_size={max(batch // 2, 1)}, or use precision: "
                                    f"mixed_bfloat16{again}") from None

    def callbacks(self, phase: Phase) -> list:
        """The Keras callbacks of ``phase``, in the order their effects must come at the end of an
        epoch for exact resume: recorded, judged by early stopping, checkpointed, written out."""
        from transferkit.training import callbacks as cb

        imag, spec = phase.name == "imag", self.recipe.finetune.early_stopping
        callbacks = [cb.Reseed(self.recipe.seed), cb.NanGuard(),
                     cb.RecordEpoch(self.record, phase.name, self.optimizer, relabel=self._imag_logs if imag else None)]
        if phase.name == "finetune" and spec is not None:
            callbacks.append(cb.EarlyStopping(self.record, self.early_stopping, monitor=spec.monitor,
                                              min_delta=spec.min_delta, patience=spec.patience,
                                              keep_best=lambda: self.checkpoints.save_best(self.model)))
        return callbacks + [
            cb.SaveCheckpoint(self.checkpoints, self.model, self.optimizer, functools.partial(self._state, phase),
                              head=(lambda: get_head_weights(self.trained)) if imag else None, head_until=phase.last),
            cb.WriteHistory(self.folder, self.record, f"{self.recipe.name}: training", plot=self.plot_history),
            cb.LogEpoch(self.record, self.total)]

    def _imag_logs(self, logs: dict) -> dict:
        """An imag epoch's logs: its own (on the imagined labels) as ``imag_*``, ``val_*`` with the normal head."""
        normal = self.model.evaluate(self.val, verbose=0, return_dict=True)
        return {f"imag_{key}": value for key, value in logs.items()} | {
            f"val_{key}": float(value) for key, value in normal.items()}

    def _prepare(self, phase: Phase, steps: int):
        """Sets the phase's trainable layers, model and compiled optimizer (resuming: its checkpointed
        state); returns the model to fit (behind the in-model augmentation, if any)."""
        from transferkit.models.surgery import body_layers, count_parameters, freeze, set_trainable, unfreeze

        resuming = self.epoch > phase.first
        if phase.name == "warmup" or (phase.name == "imag" and self.recipe.imag.train == "head"):
            set_trainable(self.model, [layer.name for layer in self.model.layers])
            freeze(body_layers(self.model))
        else:
            spec = self.recipe.finetune.unfreeze
            with RecipeError.under("finetune.unfreeze"):
                unfreeze(self.model, from_layer=spec.from_layer, top_blocks=spec.top_blocks, fraction=spec.fraction,
                         everything=spec.all, train_batchnorm=spec.train_batchnorm)
        self.trained = self._imag_model(phase, resuming) if phase.name == "imag" else self.model
        fitted = self.trained if self.augment is None else with_augmentation(self.trained, self.augment)
        counts = count_parameters(self.trained)
        self.parameters[phase.name] = counts
        log.info("%s: epochs %d-%d, %s trainable of %s parameters", phase.name, phase.first + 1, phase.last,
                 f"{counts['trainable']:,}", f"{counts['total']:,}")
        optimizer = self.optimizer = self._optimizer(phase, steps)
        self._compile(fitted, phase, optimizer)
        if phase.name == "imag":  # the normal model only validates, in end_epoch
            self._compile(self.model, phase, "sgd")
        if resuming:
            self._restore_optimizer(optimizer)
        elif phase.name != "warmup":  # carry on along the schedule after earlier episodes
            optimizer.iterations.assign((phase.first - self.budget_first) * steps)
        return fitted

    def _restore_optimizer(self, optimizer) -> None:
        """Builds ``optimizer`` and loads the variables checkpointed with the current epoch."""
        optimizer.build(self.trained.trainable_variables)
        values = self.checkpoints.load_optimizer(self.epoch)
        if len(values) != len(optimizer.variables):
            raise TrainingError(f"the checkpoint's optimizer state ({len(values)} variables) does not fit this "
                                f"recipe's optimizer ({len(optimizer.variables)}): the recipe changed since the "
                                "run stopped; put it back, or start over with --restart")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)

    def _compile(self, model, phase: Phase, optimizer) -> None:
        import keras

        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
        if self.num_classes > 5:
            metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
        model.compile(optimizer=optimizer, metrics=metrics, jit_compile=self.recipe.jit_compile,
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=self._label_smoothing(phase)))
        self.jit_compile = bool(model.jit_compile)  # "auto" resolved: XLA on a GPU and under JAX

    def _imag_model(self, phase: Phase, resuming: bool):
        """The body with a fresh head (seeded per episode); resuming, the head's checkpointed weights.

        The head is ``imag.head``'s, else one like the normal head (the recipe's ``head``, or the
        custom head function called again). The normal head is not part of this model, so it stays
        exactly as it is while the imag episode trains the shared body.
        """
        import keras

        from transferkit.models.heads import build_head
        from transferkit.models.surgery import HEAD_POOL

        head = {key: value for key, value in asdict(self.recipe.imag.head or self.recipe.head).items()
                if key != "pooling"}  # the cut is pooled already
        if self.recipe.imag.head is None and self.head is not None:
            head["custom"] = self.head
        keras.utils.set_random_seed(episode_seed(self.recipe.seed, phase.episode))
        with dtype_policy(self.precision), RecipeError.under("head"):
            outputs = build_head(self.model.get_layer(HEAD_POOL).output, self.num_classes, **head)
        model = keras.Model(self.model.input, outputs, name=f"{self.model.name}_imag")
        if resuming:
            set_head_weights(model, self.checkpoints.load_imag_head(self.epoch))
        return model

    def finish(self) -> None:
        """Restores the best epoch's weights when early stopping asks for it."""
        spec = self.recipe.finetune.early_stopping
        saved = self.checkpoints.has_weights()  # the best epoch's
        if spec is not None and spec.restore_best_weights and saved and self.early_stopping.get("best_epoch") != self.epoch:
            self.checkpoints.load_weights(self.model)
            log.info("restored the weights of epoch %d (best %s %.4f)", self.early_stopping["best_epoch"],
                     spec.monitor, self.early_stopping["best"])

    def _optimizer(self, phase: Phase, steps_per_epoch: int):
        from transferkit.training.optim import build_optimizer, layer_decay_multipliers
        from transferkit.training.schedules import build_schedule

        fields = asdict(phase.optimizer)
        if phase.name != "warmup":
            spec, schedule = self.recipe.finetune, asdict(self.recipe.finetune.schedule)
            with RecipeError.under("finetune.schedule"):
                fields["learning_rate"] = build_schedule(schedule.pop("name"), fields["learning_rate"], spec.epochs,
                                                         steps_per_epoch, **schedule)
            if spec.layer_decay:
                with RecipeError.under("finetune"):
                    fields["layer_multipliers"] = layer_decay_multipliers(self.trained, spec.layer_decay)
        with RecipeError.under(f"{_section(phase)}.optimizer"):
            return build_optimizer(**fields)

    def _label_smoothing(self, phase: Phase) -> float:
        return self.recipe.finetune.label_smoothing if phase.name != "warmup" else 0.0

    def _state(self, phase: Phase) -> dict:
        return {"total_epochs": self.total, "phase": phase.name, "history": self.history, "phases": self.phases,
                "early_stopping": self.early_stopping, "parameters": self.parameters,
                "seconds": round(self.seconds, 2)}
