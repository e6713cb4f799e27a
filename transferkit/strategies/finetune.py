"""Fine-tuning by network surgery: a new head on the frozen body, warm it up, unfreeze, train on.

Training runs as a list of phases (``warmup``, then ``finetune``; with ``strategy: imag`` the
fine-tuning epochs alternate ``finetune`` and ``imag`` episodes, see :mod:`transferkit.training.imag`), each
with its own trainable layers, optimizer and epoch range in one shared epoch count.

The run is written into ``<output>.partial`` beside the output folder, which is replaced in one
step when the run is complete (see :mod:`transferkit.outputs`). After every epoch that sibling gets:

    checkpoint/epoch-N.weights.npz, epoch-N.optimizer.npz   model and optimizer state of epoch N
    checkpoint/epoch-N.imag_head.npz                        inside an imag episode: its head
    checkpoint/best.weights.npz                             best epoch so far (early stopping)
    checkpoint/state.json                                   epoch, phase, history, early stopping
    history.json, history.csv, curves.png                   the training monitor

``state.json`` is written last, so it only ever names complete files; ``resume=True`` rebuilds the
model from the recipe, loads them and carries on with the next epoch. Every random draw of an epoch
(its order, augmentation, MixUp/CutMix, dropout) is derived from the recipe's seed and the epoch
number alone, so the resumed run ends with the weights an uninterrupted run ends with. A finished
run drops its checkpoint folder and leaves ``model/model.keras`` and the reports.

Example:
    >>> run = finetune(load_recipe("recipes/flowers5_finetune.yaml"))
    >>> run.metrics["val"]["top1"], run.info["diagnosis"]["verdict"]
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.training.accelerator import augment_placement, distribution, dtype_policy, out_of_memory, resolve_precision
from transferkit.data.augment import build_augmentation
from transferkit.errors import DeviceMemoryError, RecipeError, TransferkitError
from transferkit.io import atomic_path, atomic_write_json, atomic_write_text, disk_full_is_one_line, require_space
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import OutputFolder
from transferkit.data.pipelines import (MODEL, fitting_batch_size, make_dataset, reseed, reseed_backend, seed_states,
                                   steps_per_epoch)
from transferkit.recipe import OptimizerSpec, Recipe, load_recipe
from transferkit.run import Run
from transferkit.recipe import recipe_splits
from transferkit.strategies import check_recipe, preflight

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


def plan_phases(recipe: Recipe) -> list[Phase]:
    """The phases a recipe asks for, with their epoch ranges; empty phases are left out."""
    from transferkit.training.imag import episode_plan

    warmup = 0 if recipe.warmup.linear_probe else recipe.warmup.epochs
    phases = [Phase("warmup", 0, warmup, recipe.warmup.optimizer)] if warmup else []
    epochs, imag = recipe.finetune.epochs, recipe.imag
    episodes = (episode_plan(epochs, imag.normal_epochs, imag.imag_epochs) if recipe.strategy == "imag"
                else [("finetune", epochs)] if epochs else [])
    first, imag_count = warmup, 0
    for kind, length in episodes:
        imag_count += kind == "imag"
        phases.append(Phase(kind, first, first + length, recipe.finetune.optimizer,
                            episode=imag_count if kind == "imag" else 0))
        first += length
    return phases


def finetune(recipe: Recipe | str | Path, *, head=None, backbone=None, resume: bool = False,
             restart: bool = False, progress: bool = True) -> Run:
    """Train the fine-tuning strategy (``finetune`` or ``imag``) end to end and write its run folder.

    Args:
        recipe: a :class:`Recipe` or the path of a recipe file.
        head: a custom head ``head(features, num_classes) -> probabilities`` (or an import path),
            used instead of ``recipe.head``; see :mod:`transferkit.models.heads`.
        backbone: a Keras model of your own (raw 0..255 pixels in) used instead of
            ``recipe.backbone``, or a function returning one; its output (a feature map or
            vector) gets the head. Unless ``finetune.unfreeze`` says otherwise all of it trains.
        resume: continue an interrupted run from its last finished epoch.
        restart: throw an interrupted run's checkpoint away and start over.
        progress: show Keras' per-batch progress bar on a terminal (an epoch summary is always logged).

    Returns:
        The :class:`Run`, saved to ``recipe.output``, with ``metrics``, ``history`` (one entry per
        epoch, ``history["phase"]`` naming each epoch's phase) and ``info["diagnosis"]``.

    Raises:
        TrainingError: an unfinished run in the folder without resume/restart, or a loss that
            became NaN (the last good epoch stays resumable).
        DeviceMemoryError: the device ran out of memory (the last finished epoch stays resumable).
        ResourceError: another run uses the output folder, or the disk is full (the last finished
            epoch stays resumable).
    """
    import keras

    log_to_stderr_unless_configured()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    started = time.perf_counter()
    if backbone is None:
        image_size = preflight(recipe)
    else:
        check_recipe(recipe, own_backbone=True)
        backbone = backbone if isinstance(backbone, keras.Model) else backbone()
        image_size = recipe.data.image_size or backbone.input.shape[1]
    with OutputFolder(recipe.output, resumable=lambda partial: Checkpoints.of(partial).state() is not None,
                      restart=restart) as out, disk_full_is_one_line(out.partial, then=_AGAIN):
        _adopt_earlier_checkpoint(out, restart)
        state = _starting_state(Checkpoints.of(out.partial), out.path, resume)
        run = _train(recipe, out.partial, state, image_size, head=head, backbone=backbone, progress=progress)
        run.info["seconds"]["this_session"] = round(time.perf_counter() - started, 2)
        run.save(out.partial)
        out.commit(drop=("checkpoint",))
    run.folder = out.path
    log.info("run saved to %s (%.1fs)", out.path, time.perf_counter() - started)
    return run


_AGAIN = ", then run the same command again with --resume (the last finished epoch is kept)"


def _train(recipe: Recipe, folder: Path, state: dict | None, image_size: int, head, backbone, progress: bool) -> Run:
    """Train (or go on training) in ``folder``, write the reports there and return the unsaved Run."""
    import keras

    from transferkit.training.diagnose import diagnose
    from transferkit.reports.evaluate import format_metrics, write_report

    checkpoints = Checkpoints.of(folder)
    splits = recipe_splits(recipe)
    if splits.val is None:
        raise RecipeError("data.val: fine-tuning needs a validation split to monitor: "
                          "give a fraction (0.2) or a folder")
    class_names = splits.class_names
    batch_size = fitting_batch_size(recipe.data.batch_size, len(splits.train))
    precision = resolve_precision(recipe.precision)
    keras.utils.set_random_seed(recipe.seed)
    with distribution(recipe.distribute), dtype_policy(precision):
        model = build_model(recipe, len(class_names), image_size, head=head, backbone=backbone)
    log.info("model: %s + head, %d classes, %dpx, precision %s", recipe.backbone.name if backbone is None
             else backbone.name, len(class_names), image_size, precision)

    phases = plan_phases(recipe)
    augment = build_augmentation(recipe.data.augment, seed=recipe.seed)
    placement = augment_placement(recipe.data.augment_on)
    if augment is not None:
        log.info("augmentation runs in the %s", "model (training step)" if placement == "model" else "input pipeline")
    val = make_dataset(splits.val, image_size, batch_size, num_classes=len(class_names), cache=recipe.data.cache)
    trainer = _Trainer(recipe, model, checkpoints, folder, phases, val, state, head=head, precision=precision,
                       augment=augment if placement == "model" else None)
    steps = steps_per_epoch(len(splits.train), batch_size)
    trainer.check_optimizers(steps)
    if state is not None:
        checkpoints.load_weights(model, state["epoch"])
        log.info("resuming after epoch %d of %d (%s)", state["epoch"], trainer.total, state["phase"])
    elif recipe.warmup.linear_probe:
        _linear_probe(recipe, model, splits, image_size, progress)
    log.info("training in %s (moved to %s when complete)", folder, recipe.output)
    with distribution(recipe.distribute):
        for phase in phases:
            if trainer.epoch >= phase.last or trainer.stopped:
                continue
            train = _train_dataset(recipe, phase, splits.train, image_size, batch_size, class_names,
                                   augment if placement == "pipeline" else None, first=trainer.epoch)
            trainer.run_phase(phase, train, steps, verbose=1 if progress and sys.stderr.isatty() else 0)
    trainer.finish()

    run = Run(recipe=recipe, class_names=class_names, image_size=image_size, model=model,
              history={**trainer.history, "phase": trainer.phases})
    for name, images in (("val", splits.val), ("test", splits.test)):
        if images is not None:
            data = make_dataset(images, image_size, fitting_batch_size(batch_size, len(images), name))
            probabilities = model.predict(data, verbose=0).astype("float64")
            run.metrics[name] = write_report(folder, images.labels, probabilities, class_names,
                                             paths=images.paths, prefix=name)
            log.info("%s: %s", name, format_metrics(run.metrics[name]))
    diagnosis = diagnose(trainer.history, trainer.phases) if trainer.phases else None
    if diagnosis is not None:
        atomic_write_text(folder / "diagnosis.txt", diagnosis.to_text() + "\n")
        log.info("%s", diagnosis.to_text())
    run.info = {"seconds": {"train": round(trainer.seconds, 2)},
                "images": {name: len(images) for name, images in
                           (("train", splits.train), ("val", splits.val), ("test", splits.test)) if images},
                "epochs": len(trainer.phases), "precision": precision, "jit_compile": trainer.jit_compile,
                "parameters": trainer.parameters,
                "augment_on": placement if augment is not None else None,
                "early_stopping": trainer.early_stopping,
                "diagnosis": diagnosis.to_dict() if diagnosis else None}
    return run


def unfinished_run(output: str | Path) -> dict | None:
    """The checkpoint state of an unfinished run into ``output``, or None."""
    output = Path(output)
    return Checkpoints.of(output.with_name(f"{output.name}.partial")).state()


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------

def build_model(recipe: Recipe, num_classes: int, image_size: int, head=None, backbone=None):
    """The backbone (the recipe's, or a given model) cut at its top, with the recipe's or a custom head."""
    from transferkit.models.backbones import create_backbone
    from transferkit.models.heads import attach_head

    spec = recipe.backbone
    body = backbone or create_backbone(spec.name, weights=spec.weights, image_size=image_size, alpha=spec.alpha,
                                       **spec.options)
    return attach_head(body, num_classes, recipe.head, head=head)


def with_augmentation(model, augment):
    """``model`` behind ``augment``: the layers act in training only, ``model`` keeps its weights."""
    import keras

    inputs = keras.Input(model.input.shape[1:], name="pixels")
    return keras.Model(inputs, model(augment(inputs)), name=f"{model.name}_augmented")


def _train_dataset(recipe: Recipe, phase: Phase, images, image_size: int, batch_size: int, class_names: list[str],
                   augment=None, first: int = 0):
    """The phase's epochs from ``first`` on: shuffled one-hot batches, augmented by ``augment``;
    MixUp/CutMix after warm-up; imagined labels in imag episodes. Each epoch's draws depend on the
    recipe's seed and the epoch alone (see :func:`transferkit.data.pipelines.make_dataset`)."""
    from transferkit.data.augment import BatchMixer

    if phase.name == "imag":
        images = imagined(images, recipe, phase.episode)
    spec = recipe.finetune
    mix = (functools.partial(BatchMixer, spec.mixup, spec.cutmix)
           if phase.name != "warmup" and (spec.mixup or spec.cutmix) else None)
    return make_dataset(images, image_size, batch_size, augment=augment, seed=recipe.seed,
                        num_classes=len(class_names), mix=mix, cache=recipe.data.cache,
                        epochs=range(max(first, phase.first), phase.last))


def episode_seed(seed: int, episode: int) -> int:
    """The seed of imag episode ``episode``'s label permutation and fresh head (any recipe seed fits)."""
    return (seed * 1000 + episode) % 2**32


def imagined(images, recipe: Recipe, episode: int):
    """``images`` with the imagined labels of imag episode ``episode`` (its own seeded permutation)."""
    from transferkit.training.imag import label_mapping

    mapping = label_mapping(recipe.imag.mapping, images.class_names, seed=episode_seed(recipe.seed, episode))
    log.info("imag episode %d: %s", episode, ", ".join(f"{images.class_names[i]}->{images.class_names[j]}"
                                                      for i, j in enumerate(mapping) if i != j))
    return dataclasses.replace(images, labels=mapping[images.labels])


def _linear_probe(recipe: Recipe, model, splits, image_size: int, progress: bool) -> None:
    """LP-FT: set ``head_logits`` to a logistic regression fitted on cached pooled features."""
    import keras

    from transferkit.features.classifiers import build_classifier, fit_cached, fold_linear_classifier
    from transferkit.io import transferkit_home
    from transferkit.recipe import ExtractSpec
    from transferkit.strategies.extract import cached_features
    from transferkit.models.surgery import HEAD_POOL

    names = [layer.name for layer in model.layers]
    if "head_logits" not in names or names[names.index(HEAD_POOL) + 1:] not in (
            ["head_logits", "probabilities"], ["head_dropout", "head_logits", "probabilities"]):
        raise RecipeError("warmup.linear_probe: needs the built-in head without hidden layers "
                          "(head.layers: [], no head function); or use warmup.epochs instead")
    probe = dataclasses.replace(recipe, extract=ExtractSpec(layer="top", pooling=recipe.head.pooling,
                                                            tta=False, power_norm=False))
    extractor = keras.Model(model.input, model.get_layer(HEAD_POOL).output)
    features = cached_features(probe, extractor, image_size, {"train": splits.train}, progress)
    x, y = features["train"]
    classifier = build_classifier(probe.extract.classifier, seed=recipe.seed,
                                  n_samples_per_class=int(np.bincount(y).min()))
    classifier, _ = fit_cached(classifier, x, y, transferkit_home() / "classifiers")
    kernel, bias, classes = fold_linear_classifier(classifier, "logistic_regression")
    order = np.argsort(classes)
    model.get_layer("head_logits").set_weights([kernel[:, order].astype("float32"), bias[order].astype("float32")])
    log.info("warm-up: head initialised from a logistic regression on %d cached feature vectors (LP-FT)", len(x))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

class Checkpoints:
    """The ``checkpoint/`` folder of a run: per-epoch weights and optimizer state, ``state.json``.

    Arrays are written with NumPy (``.npz``, atomically), not HDF5: on a full disk a write fails with
    an ordinary error and the earlier epoch stays, where HDF5 leaves its library unusable.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def of(cls, run_folder: Path) -> "Checkpoints":
        return cls(Path(run_folder) / "checkpoint")

    def state(self) -> dict | None:
        """The last saved state, or None when there is no unfinished run."""
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def weights(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.weights.npz"

    @property
    def best(self) -> Path:
        return self.folder / "best.weights.npz"

    def optimizer(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.optimizer.npz"

    def imag_head(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch}.imag_head.npz"

    def save(self, model, optimizer, epoch: int, state: dict, imag_head: list | None = None) -> None:
        """The model's weights, the optimizer's state (and inside an imag episode the imag head's
        weights) of ``epoch``, then ``state.json``, then older epochs go."""
        import keras

        optimizer_state = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
        weights = model.get_weights()
        require_space(self.folder, sum(a.nbytes for a in [*weights, *optimizer_state, *(imag_head or [])]),
                      f"the epoch {epoch} checkpoint", then=_AGAIN)
        try:
            _save_arrays(self.weights(epoch), weights)
            _save_arrays(self.optimizer(epoch), optimizer_state)
            if imag_head is not None:
                _save_arrays(self.imag_head(epoch), imag_head)
            atomic_write_json(self.folder / "state.json", {**state, "epoch": epoch})
        except BaseException:  # state.json still names the last complete epoch: give the space back
            self._remove_epochs(keep=(self.state() or {}).get("epoch"))
            raise
        self._remove_epochs(keep=epoch)

    def _remove_epochs(self, keep: int | None) -> None:
        for path in self.folder.glob("epoch-*"):
            if not path.name.startswith(f"epoch-{keep}."):
                path.unlink()

    def save_best(self, model) -> None:
        weights = model.get_weights()
        require_space(self.folder, sum(a.nbytes for a in weights), "the best epoch's weights", then=_AGAIN)
        _save_arrays(self.best, weights)

    def load_weights(self, model, epoch: int | None = None) -> None:
        """Put the weights of ``epoch`` (None: the best epoch) into ``model``."""
        path = self.best if epoch is None else self.weights(epoch)
        earlier = path.with_name(path.name.replace(".weights.npz", ".weights.h5"))
        if not path.is_file() and earlier.is_file():  # written by an earlier transferkit
            model.load_weights(earlier)
            return
        model.set_weights(_load_arrays(path))

    def restore_optimizer(self, optimizer, trainable_variables, epoch: int) -> None:
        """Builds ``optimizer`` and loads the variables saved with ``epoch``."""
        optimizer.build(trainable_variables)
        values = _load_arrays(self.optimizer(epoch))
        if len(values) != len(optimizer.variables):
            raise TrainingError(f"the checkpoint's optimizer state ({len(values)} variables) does not fit this "
                                f"recipe's optimizer ({len(optimizer.variables)}): the recipe changed since the "
                                "run stopped; put it back, or start over with --restart")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _save_arrays(path: Path, arrays: list) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            np.savez(file, **{f"v{i}": array for i, array in enumerate(arrays)})


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"v{i}"] for i in range(len(saved.files))]


def _finished(state: dict) -> bool:
    return state["epoch"] >= state["total_epochs"] or bool(state.get("early_stopping", {}).get("stopped"))


def _adopt_earlier_checkpoint(out: OutputFolder, restart: bool) -> None:
    """A ``checkpoint/`` inside the output folder itself is either what a finished run had not yet
    dropped when it was killed (removed), or an unfinished run of an earlier transferkit, which
    checkpointed there (moved beside, so that ``--resume`` continues it; ``--restart`` removes it)."""
    earlier = Checkpoints.of(out.path)
    state = earlier.state() if earlier.folder.is_dir() else None
    if state is not None and not restart and not _finished(state) and Checkpoints.of(out.partial).state() is None:
        shutil.rmtree(Checkpoints.of(out.partial).folder, ignore_errors=True)
        earlier.folder.rename(Checkpoints.of(out.partial).folder)
    else:
        earlier.clear()


def _starting_state(checkpoints: Checkpoints, output: Path, resume: bool) -> dict | None:
    state = checkpoints.state()
    if state is not None and not resume:
        raise TrainingError(f"{output} has an unfinished run in {checkpoints.folder.parent.name} (stopped after epoch "
                            f"{state['epoch']} of {state['total_epochs']}): add --resume to continue it "
                            "or --restart to start over")
    if state is None and resume:
        log.info("nothing to resume in %s: starting from epoch 1", checkpoints.folder.parent)
    return state


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

class _Trainer:
    """Runs the phases and keeps the shared epoch count, history, early stopping and checkpoints."""

    def __init__(self, recipe: Recipe, model, checkpoints: Checkpoints, folder: Path, phases: list[Phase], val,
                 state, head=None, precision: str = "float32", augment=None):
        state = state or {}
        self.recipe, self.model, self.checkpoints, self.folder, self.val = recipe, model, checkpoints, folder, val
        self.head, self.precision, self.augment = head, precision, augment  # augment: in-model augmentation
        self.phases_planned, self.total = phases, phases[-1].last if phases else 0
        # the fine-tuning schedule runs over all finetune and imag episodes together
        self.budget_first = next((phase.first for phase in phases if phase.name != "warmup"), 0)
        self.trained = model  # the model being trained: ``model``, or in an imag episode the imag model
        self.optimizer = None  # the current phase's
        self.jit_compile = False
        self.epoch = state.get("epoch", 0)
        self.history: dict[str, list] = state.get("history", {})
        self.phases: list[str] = state.get("phases", [])
        self.early_stopping: dict = state.get("early_stopping", {})
        self.parameters: dict = state.get("parameters", {})
        self.seconds: float = state.get("seconds", 0.0)
        self.num_classes = model.output.shape[-1]

    @property
    def stopped(self) -> bool:
        return bool(self.early_stopping.get("stopped"))

    def check_optimizers(self, steps: int) -> None:
        """Build every phase's optimizer and schedule once, so that a bad setting fails before
        the first epoch rather than after the warm-up."""
        for phase in {phase.name: phase for phase in self.phases_planned}.values():
            self._optimizer(phase, steps)

    def run_phase(self, phase: Phase, train, steps: int, verbose: int) -> None:
        from transferkit.models.surgery import body_layers, count_parameters, freeze, set_trainable, unfreeze

        resuming = self.epoch > phase.first
        if phase.name == "warmup" or (phase.name == "imag" and self.recipe.imag.train == "head"):
            set_trainable(self.model, [layer.name for layer in self.model.layers])
            freeze(body_layers(self.model))
        else:
            unfreeze(self.model, self.recipe.finetune.unfreeze)
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
            self.checkpoints.restore_optimizer(optimizer, self.trained.trainable_variables, self.epoch)
        elif phase.name != "warmup":  # carry on along the schedule after earlier episodes
            optimizer.iterations.assign((phase.first - self.budget_first) * steps)
        monitor = _monitor_class()(self, phase)
        try:
            fitted.fit(train, validation_data=None if phase.name == "imag" else self.val, epochs=phase.last,
                       initial_epoch=self.epoch, steps_per_epoch=steps, callbacks=[monitor], verbose=verbose,
                       shuffle=False)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
            if not out_of_memory(error):
                raise
            batch = self.recipe.data.batch_size
            again = f", then --resume (epoch {self.epoch} is saved)" if self.epoch else ""
            raise DeviceMemoryError(f"out of memory at data.batch_size {batch} ({phase.name}, "
                                    f"{self.recipe.data.image_size or 'default'} px): lower it, e.g. --set "
                                    f"data.batch_size={max(batch // 2, 1)}, or use precision: "
                                    f"mixed_bfloat16{again}") from None
        if monitor.diverged:
            again = f"continue after epoch {self.epoch} with --resume" if self.epoch else "run it again"
            raise TrainingError(
                f"the loss became {monitor.diverged_loss} in epoch {self.epoch + 1} ({phase.name}): lower "
                f"{_section(phase)}.optimizer.learning_rate (now {phase.optimizer.learning_rate}), add warm-up "
                f"epochs or use precision: float32, then {again}")

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

        spec = self.recipe.imag.head or self.recipe.head
        keras.utils.set_random_seed(episode_seed(self.recipe.seed, phase.episode))
        with dtype_policy(self.precision):
            outputs = build_head(self.model.get_layer(HEAD_POOL).output, self.num_classes, spec,
                                 None if self.recipe.imag.head else self.head)
        model = keras.Model(self.model.input, outputs, name=f"{self.model.name}_imag")
        if resuming:
            set_head_weights(model, _load_arrays(self.checkpoints.imag_head(self.epoch)))
        return model

    def finish(self) -> None:
        """Restores the best epoch's weights when early stopping asks for it."""
        spec = self.recipe.finetune.early_stopping
        best = self.checkpoints.best
        saved = best.is_file() or best.with_name("best.weights.h5").is_file()  # .h5: an earlier transferkit's
        if spec is not None and spec.restore_best_weights and saved and self.early_stopping.get("best_epoch") != self.epoch:
            self.checkpoints.load_weights(self.model)
            log.info("restored the weights of epoch %d (best %s %.4f)", self.early_stopping["best_epoch"],
                     spec.monitor, self.early_stopping["best"])

    def end_epoch(self, phase: Phase, logs: dict, seconds: float) -> None:
        """Records an epoch, updates early stopping, checkpoints and rewrites the monitor files."""
        import keras

        self.epoch += 1
        logs = {key: float(value) for key, value in logs.items()}
        if phase.name == "imag":  # train metrics on the imagined labels, val with the normal head
            normal = self.model.evaluate(self.val, verbose=0, return_dict=True)
            logs = {f"imag_{key}": value for key, value in logs.items()}
            logs |= {f"val_{key}": float(value) for key, value in normal.items()}
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        logs["seconds"] = round(seconds, 3)
        for key in set(self.history) | set(logs):
            self.history.setdefault(key, [None] * len(self.phases)).append(logs.get(key))
        self.phases.append(phase.name)
        self.seconds += seconds
        if phase.name == "finetune" and self._early_stop(logs):
            self.model.stop_training = True
        inside_imag = phase.name == "imag" and self.epoch < phase.last
        self.checkpoints.save(self.model, self.optimizer, self.epoch, self._state(phase),
                              imag_head=get_head_weights(self.trained) if inside_imag else None)
        self._write_monitor()
        shown = "  ".join(f"{key} {logs[key]:.4f}" for key in
                          ("loss", "accuracy", "imag_loss", "imag_accuracy", "val_loss", "val_accuracy")
                          if key in logs)
        log.info("epoch %d/%d [%s]  %s  lr %.2e  (%.0fs)", self.epoch, self.total, phase.name, shown,
                 logs["learning_rate"], seconds)

    def _early_stop(self, logs: dict) -> bool:
        spec = self.recipe.finetune.early_stopping
        if spec is None:
            return False
        if spec.monitor not in logs:
            raise RecipeError(f"finetune.early_stopping.monitor: {spec.monitor!r} is not logged; give one of "
                              f"{', '.join(sorted(k for k in logs if k != 'learning_rate'))}")
        value, state = logs[spec.monitor], self.early_stopping
        sign = 1 if "loss" in spec.monitor else -1  # losses fall, accuracies rise
        if "best" not in state or sign * (value - state["best"]) < -spec.min_delta:
            state.update(best=value, best_epoch=self.epoch, wait=0)
            self.checkpoints.save_best(self.model)
            return False
        state["wait"] += 1
        if state["wait"] >= spec.patience:
            state["stopped"] = True
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                     spec.monitor, state["wait"], state["best"], state["best_epoch"])
        return self.stopped

    def begin_epoch(self, fitted, epoch: int) -> None:
        """Seed the random layers (dropout, augmentation in the model) from the recipe's seed and
        ``epoch`` (0-based), so that a resumed run draws what an uninterrupted one draws."""
        reseed(seed_states(fitted), self.recipe.seed, MODEL, epoch)

    def begin_batch(self, batch: int) -> None:
        """Seed the backend's global generator from the recipe's seed, the epoch (``self.epoch``, the
        epochs finished) and ``batch``: what draws from it (PyTorch's dropout without a seed) does not
        depend on what drew before, such as a data loader started here only because the run resumed."""
        reseed_backend(self.recipe.seed, self.epoch, batch)

    def _optimizer(self, phase: Phase, steps_per_epoch: int):
        from transferkit.training.optim import build_optimizer, build_schedule, layer_decay_multipliers

        try:
            if phase.name == "warmup":
                return build_optimizer(phase.optimizer)
            spec = self.recipe.finetune
            schedule = build_schedule(spec.schedule, phase.optimizer.learning_rate, spec.epochs, steps_per_epoch)
            multipliers = layer_decay_multipliers(self.trained, spec.layer_decay) if spec.layer_decay else None
            return build_optimizer(phase.optimizer, schedule, layer_multipliers=multipliers)
        except RecipeError as error:
            message = str(error)
            raise RecipeError(message if message.startswith(("finetune.", "warmup.")) else
                              f"{_section(phase)}.{message}") from None

    def _label_smoothing(self, phase: Phase) -> float:
        return self.recipe.finetune.label_smoothing if phase.name != "warmup" else 0.0

    def _state(self, phase: Phase) -> dict:
        return {"total_epochs": self.total, "phase": phase.name, "history": self.history, "phases": self.phases,
                "early_stopping": self.early_stopping, "parameters": self.parameters,
                "seconds": round(self.seconds, 2)}

    def _write_monitor(self) -> None:
        from transferkit.reports.evaluate import plot_history

        atomic_write_json(self.folder / "history.json", {**self.history, "phase": self.phases})
        keys = sorted(self.history)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["epoch", "phase", *keys])
        for i, phase in enumerate(self.phases):
            writer.writerow([i + 1, phase, *("" if self.history[k][i] is None else self.history[k][i] for k in keys)])
        atomic_write_text(self.folder / "history.csv", text.getvalue())
        curves = {k: v for k, v in self.history.items() if k not in ("learning_rate", "seconds")}
        plot_history(curves, self.folder / "curves.png", phases=self.phases, title=f"{self.recipe.name}: training")


def _section(phase: Phase) -> str:
    """The recipe section that configures a phase."""
    return "warmup" if phase.name == "warmup" else "finetune"


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


@functools.cache
def _monitor_class():
    import keras

    class Monitor(keras.callbacks.Callback):
        """Hands each finished epoch to the trainer; stops on a NaN loss before it is checkpointed."""

        def __init__(self, trainer: _Trainer, phase: Phase):
            super().__init__()
            self.trainer, self.phase = trainer, phase
            self.diverged, self.diverged_loss, self._started = False, None, 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.trainer.begin_epoch(self.model, epoch)
            self._started = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            self.trainer.begin_batch(batch)

        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get("loss", math.nan))
            if not math.isfinite(loss):
                self.diverged, self.diverged_loss = True, loss
                self.model.stop_training = True
                return
            self.trainer.end_epoch(self.phase, logs, time.perf_counter() - self._started)

    return Monitor

