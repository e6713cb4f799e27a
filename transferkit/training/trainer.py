"""The fine-tuning loop: phases of Keras ``fit`` over one shared epoch count.

A :class:`Trainer` runs the :class:`Phase` list it is given (warm-up, fine-tuning, imag episodes;
planned by :mod:`transferkit.strategies.finetune`), each with its own trainable layers, optimizer and
epoch range. Each phase's ``fit`` gets the Keras callbacks of :mod:`transferkit.training.callbacks`,
one per concern, in the order their effects must come at the end of an epoch: the epoch is recorded
in the :class:`TrainingRecord`, judged by early stopping, checkpointed
(:mod:`transferkit.training.checkpoints`) and written to the monitor files. Every random draw of an
epoch is reseeded from the seed and the epoch (and batch) alone, so that a resumed run ends
with the weights an uninterrupted run ends with.

The Trainer takes plain values (:class:`TrainingSettings`, phases with optimizer keywords) and names its
own arguments in a :class:`~transferkit.errors.RecipeError`'s key (``unfreeze``, ``schedule``,
``layer_decay``, ``optimizer``, ``early_stopping``, ``imag_head``); :mod:`transferkit.strategies.phases`
maps the recipe onto them and puts the recipe's keys in front.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import RecipeError, TransferkitError
from transferkit.training.accelerator import dtype_policy
from transferkit.training.checkpoints import Checkpoints

log = logging.getLogger("transferkit")


class TrainingError(TransferkitError):
    """Training cannot go on (the loss diverged, an unfinished run is in the way)."""


class LossDiverged(Exception):
    """Raised by :class:`~transferkit.training.callbacks.NanGuard` out of ``fit``: the epoch's ``loss``
    is not finite. Defined here, beside :class:`TrainingError`, so that catching it imports no Keras."""

    def __init__(self, loss: float):
        super().__init__(f"the loss became {loss}")
        self.loss = loss


@dataclass
class Phase:
    """A stretch of training with one trainable set and one optimizer."""
    name: str       # "warmup", "finetune" or "imag"
    first: int      # epochs done before it starts
    last: int       # epochs done when it ends
    optimizer: dict  # keywords of transferkit.training.optim.build_optimizer
    episode: int = 0  # imag episodes: 1, 2, ... (seeds the fresh head and the label permutation)


@dataclass(frozen=True)
class TrainingSettings:
    """How the Trainer trains, beyond the phases: plain values (keywords of the building blocks)."""
    seed: int                 # every epoch's random draws are reseeded from it
    title: str                # the training curves' title
    epochs: int = 0           # the fine-tuning epochs, over which the schedule runs
    unfreeze: dict = field(default_factory=dict)   # keywords of models.surgery.unfreeze
    schedule: dict = field(default_factory=lambda: {"name": "constant"})  # name + keywords of build_schedule
    early_stopping: dict | None = None  # monitor, min_delta, patience, restore_best_weights; None: off
    layer_decay: float | None = None    # layer-wise learning-rate decay after the warm-up
    label_smoothing: float = 0.0        # after the warm-up
    imag_train: str = "head_and_body"   # "head": imag episodes train their head only
    imag_head: dict = field(default_factory=dict)  # keywords of models.heads.build_head for imag heads
    jit_compile: bool | str = "auto"
    tensorboard_steps: int | None = None  # TensorBoard scalars (every N steps, and per epoch); None: none


def episode_seed(seed: int, episode: int) -> int:
    """The seed of imag episode ``episode``'s label permutation and fresh head (any seed fits)."""
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


class Trainer:
    """Runs the phases and keeps the shared epoch count, history, early stopping and checkpoints."""

    def __init__(self, settings: TrainingSettings, model, checkpoints: Checkpoints, folder: Path,
                 phases: list[Phase], val, state, precision: str = "float32", augment=None, plot_history=None,
                 callbacks=()):
        state = state or {}
        self.extra_callbacks = list(callbacks)  # the caller's Keras callbacks, after the Trainer's own
        self.settings, self.model, self.checkpoints, self.folder, self.val = settings, model, checkpoints, folder, val
        self.precision, self.augment = precision, augment  # augment: in-model augmentation
        self.plot_history = plot_history  # draws curves.png: plot_history(curves, path, phases=..., title=...)
        self.total = phases[-1].last if phases else 0
        # the fine-tuning schedule runs over all finetune and imag episodes together
        self.budget_first = next((phase.first for phase in phases if phase.name != "warmup"), 0)
        self.trained = model  # the model being trained: ``model``, or in an imag episode the imag model
        self.optimizer = None  # the current phase's
        self.schedule = None  # the current phase's learning-rate schedule; None in the warm-up
        self.jit_compile = False
        self.record = TrainingRecord(state)
        # early stopping's state (checkpointed): ``best``, ``best_epoch``, ``wait``, ``stopped``
        self.early_stopping: dict = state.get("early_stopping", {})
        # a plateau schedule's state (checkpointed): ``scale``, ``best``, ``wait``, ``cooldown``
        self.plateau: dict = state.get("plateau", {})
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

    def run_phase(self, phase: Phase, train, steps: int, verbose: int) -> None:
        """Trains ``phase`` from the current epoch on. A loss that is not finite ends it with
        :class:`LossDiverged`; the device running out of memory, with
        the backend's error (see :func:`~transferkit.training.accelerator.out_of_memory`)."""
        fitted = self.prepare(phase, steps)
        callbacks = self.callbacks(phase)
        with RecipeError.under("early_stopping"):  # its monitor: the one argument checked inside fit
            fitted.fit(train, validation_data=None if phase.name == "imag" else self.val, epochs=phase.last,
                       initial_epoch=self.epoch, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
                       shuffle=False)

    def callbacks(self, phase: Phase) -> list:
        """The Keras callbacks of ``phase``, in the order their effects must come at the end of an
        epoch for exact resume: recorded, judged by early stopping, checkpointed, written out."""
        from transferkit.training import callbacks as cb
        from transferkit.training.multihost import is_main_process
        from transferkit.training.tensorboard import phase_loggers

        imag, spec = phase.name == "imag", self.settings.early_stopping
        callbacks = [cb.Reseed(self.settings.seed), cb.NanGuard(),
                     cb.RecordEpoch(self.record, phase.name, self.optimizer, relabel=self._imag_logs if imag else None)]
        if phase.name == "finetune" and spec is not None:
            callbacks.append(cb.EarlyStopping(self.record, self.early_stopping, monitor=spec["monitor"],
                                              min_delta=spec["min_delta"], patience=spec["patience"],
                                              keep_best=lambda: self.checkpoints.save_best(self.model)))
        if phase.name == "finetune" and self.schedule.kind == "plateau":
            callbacks.append(cb.ReduceOnPlateau(self.record, self.plateau, self.schedule))
        writes = is_main_process()  # in a multi-host run process 0 alone writes
        history = [cb.WriteHistory(self.folder, self.record, self.settings.title, plot=self.plot_history)]
        return callbacks + [
            cb.SaveCheckpoint(self.checkpoints, self.model, self.optimizer, functools.partial(self._state, phase),
                              head=(lambda: get_head_weights(self.trained)) if imag else None, head_until=phase.last),
            *(history if writes else []), cb.LogEpoch(self.record, self.total),
            *(phase_loggers(self, phase) if writes else []), *self.extra_callbacks]

    def _imag_logs(self, logs: dict) -> dict:
        """An imag epoch's logs: its own (on the imagined labels) as ``imag_*``, ``val_*`` with the normal head."""
        normal = self.model.evaluate(self.val, verbose=0, return_dict=True)
        return {f"imag_{key}": value for key, value in logs.items()} | {
            f"val_{key}": float(value) for key, value in normal.items()}

    def prepare(self, phase: Phase, steps: int):
        """Sets the phase's trainable layers, model and compiled optimizer (resuming: its checkpointed
        state); returns the model to fit (behind the in-model augmentation, if any)."""
        from transferkit.models.surgery import body_layers, count_parameters, freeze, set_trainable, unfreeze

        resuming = self.epoch > phase.first
        if phase.name == "warmup" or (phase.name == "imag" and self.settings.imag_train == "head"):
            set_trainable(self.model, [layer.name for layer in self.model.layers])
            freeze(body_layers(self.model))
        else:
            with RecipeError.under("unfreeze"):
                unfreeze(self.model, **self.settings.unfreeze)
        self.trained = self._imag_model(phase, resuming) if phase.name == "imag" else self.model
        fitted = self.trained if self.augment is None else with_augmentation(self.trained, self.augment)
        counts = count_parameters(self.trained)
        self.parameters[phase.name] = counts
        log.info("%s: epochs %d-%d, %s trainable of %s parameters", phase.name, phase.first + 1, phase.last,
                 f"{counts['trainable']:,}", f"{counts['total']:,}")
        self.schedule = None if phase.name == "warmup" else self.build_schedule(phase, steps)
        optimizer = self.optimizer = self.build_optimizer(phase, steps, self.schedule)
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
                                f"recipe's optimizer ({len(optimizer.variables)}): the recipe or transferkit changed "
                                "since the run stopped; put the recipe back, or start over with --restart")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)

    def _compile(self, model, phase: Phase, optimizer) -> None:
        import keras

        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
        if self.num_classes > 5:
            metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
        model.compile(optimizer=optimizer, metrics=metrics, jit_compile=self.settings.jit_compile,
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=self._label_smoothing(phase)))
        self.jit_compile = bool(model.jit_compile)  # "auto" resolved: XLA on a GPU and under JAX

    def _imag_model(self, phase: Phase, resuming: bool):
        """The body with a fresh head (seeded per episode); resuming, the head's checkpointed weights.

        The head is built from ``settings.imag_head``. The normal head is not part of this model, so
        it stays exactly as it is while the imag episode trains the shared body.
        """
        import keras

        from transferkit.models.heads import build_head
        from transferkit.models.surgery import HEAD_POOL

        keras.utils.set_random_seed(episode_seed(self.settings.seed, phase.episode))
        with dtype_policy(self.precision), RecipeError.under("imag_head"):
            outputs = build_head(self.model.get_layer(HEAD_POOL).output, self.num_classes, **self.settings.imag_head)
        model = keras.Model(self.model.input, outputs, name=f"{self.model.name}_imag")
        if resuming:
            set_head_weights(model, self.checkpoints.load_imag_head(self.epoch))
        return model

    def finish(self) -> None:
        """Restores the best epoch's weights when early stopping asks for it."""
        spec = self.settings.early_stopping
        saved = self.checkpoints.has_weights()  # the best epoch's
        if spec is not None and spec["restore_best_weights"] and saved and self.early_stopping.get("best_epoch") != self.epoch:
            self.checkpoints.load_weights(self.model)
            log.info("restored the weights of epoch %d (best %s %.4f)", self.early_stopping["best_epoch"],
                     spec["monitor"], self.early_stopping["best"])

    def build_optimizer(self, phase: Phase, steps_per_epoch: int, schedule=None):
        """``phase``'s optimizer; after the warm-up on ``schedule`` (None: a new :meth:`build_schedule`),
        attached to it, with the layer decay."""
        from transferkit.training.optim import build_optimizer, layer_decay_multipliers

        fields, settings = dict(phase.optimizer), self.settings
        if phase.name != "warmup":
            if schedule is None:
                schedule = self.build_schedule(phase, steps_per_epoch)
            fields["learning_rate"] = schedule
            if settings.layer_decay:  # its error's key: layer_decay
                fields["layer_multipliers"] = layer_decay_multipliers(self.trained, settings.layer_decay)
        with RecipeError.under("optimizer"):
            optimizer = build_optimizer(**fields)
        if schedule is not None:  # a plateau's scale goes on from where the run left it
            schedule.attach(optimizer, scale=self.plateau.get("scale", 1.0))
        return optimizer

    def build_schedule(self, phase: Phase, steps_per_epoch: int):
        """The schedule of the phases after the warm-up, from ``phase``'s learning rate."""
        from transferkit.training.schedules import build_schedule

        schedule = dict(self.settings.schedule)
        with RecipeError.under("schedule"):
            return build_schedule(schedule.pop("name"), phase.optimizer["learning_rate"], self.settings.epochs,
                                  steps_per_epoch, **schedule)

    def _label_smoothing(self, phase: Phase) -> float:
        return self.settings.label_smoothing if phase.name != "warmup" else 0.0

    def _state(self, phase: Phase) -> dict:
        return {"total_epochs": self.total, "phase": phase.name, "history": self.history, "phases": self.phases,
                "early_stopping": self.early_stopping, "plateau": self.plateau, "parameters": self.parameters,
                "seconds": round(self.seconds, 2)}
