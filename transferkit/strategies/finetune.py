"""Fine-tuning by network surgery: a new head on the frozen body, warm it up, unfreeze, train on.

Training runs as a list of phases (``warmup``, then ``finetune``; with ``strategy: imag`` the
fine-tuning epochs alternate ``finetune`` and ``imag`` episodes, see :mod:`transferkit.training.imag`), each
with its own trainable layers, optimizer and epoch range in one shared epoch count. This module
builds the model and data; :mod:`transferkit.strategies.phases` maps the recipe onto the phases and
settings that :mod:`transferkit.training.trainer` runs them with,
:mod:`transferkit.training.checkpoints` and :mod:`transferkit.training.callbacks` do the per-epoch work.

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

import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path

import numpy as np

from transferkit.data.augment import build_augmentation
from transferkit.data.balance import BALANCED, class_weights, label_weights
from transferkit.data.pipelines import fitting_batch_size, make_dataset, steps_per_epoch
from transferkit.errors import RecipeError
from transferkit.io import atomic_write_text, disk_full_is_one_line
from transferkit.logs import log_to_stderr_unless_configured
from transferkit.outputs import OutputFolder
from transferkit.recipe import Recipe, load_recipe
from transferkit.run import KerasPredictor, Run
from transferkit.strategies import check_data, check_recipe, preflight
from transferkit.strategies.phases import check_optimizers, plan_phases, train_phase, training_settings
from transferkit.strategies.resume import adopt_earlier_checkpoint, starting_state
from transferkit.strategies.resume import finished_run, unfinished_run  # noqa: F401 (where a run stands, asked here too)
from transferkit.strategies.tracking import track_run
from transferkit.training.accelerator import augment_placement, distribution, dtype_policy, resolve_precision
from transferkit.training.checkpoints import RESUME_HINT, Checkpoints, ReadOnlyCheckpoints
from transferkit.training.multihost import is_main_process, process_count, start_in_step
from transferkit.training.trainer import Phase, Trainer, episode_seed

log = logging.getLogger("transferkit")


def finetune(recipe: Recipe | str | Path, *, head=None, backbone=None, resume: bool = False,
             restart: bool = False, progress: bool = True, callbacks=(), evaluate_test: bool = True) -> Run:
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
        callbacks: Keras callbacks of your own, called after each epoch is recorded and checkpointed.
        evaluate_test: evaluate the recipe's test split at the end; False keeps it held out (the
            tuner's trials: only the winner sees it).

    Returns:
        The :class:`Run`, saved to ``recipe.output``, with ``metrics``, ``history`` (one entry per
        epoch, ``history["phase"]`` naming each epoch's phase) and ``info["diagnosis"]``. In a
        multi-host run (:mod:`transferkit.training.multihost`) process 0 saves it; the other
        processes, which write nothing, return it unsaved and without metrics.

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
        keras.utils.set_random_seed(recipe.seed)  # a backbone function's initial weights come from the seed too
        backbone = backbone if isinstance(backbone, keras.Model) else backbone()
        image_size = recipe.data.image_size or backbone.input.shape[1]
    train = functools.partial(_train, recipe, image_size=image_size, head=head, backbone=backbone, callbacks=callbacks,
                              evaluate_test=evaluate_test)
    if not is_main_process():  # a multi-host run's other processes train in step with process 0, writing nothing
        partial = OutputFolder(recipe.output).partial
        state = None if restart else starting_state(Checkpoints.of(partial), Path(recipe.output), resume)
        return train(partial, state, progress=False)
    with OutputFolder(recipe.output, resumable=lambda partial: Checkpoints.of(partial).state() is not None,
                      restart=restart) as out, disk_full_is_one_line(out.partial, then=RESUME_HINT):
        adopt_earlier_checkpoint(out, restart)
        run = train(out.partial, starting_state(Checkpoints.of(out.partial), out.path, resume), progress=progress)
        run.info["seconds"]["this_session"] = round(time.perf_counter() - started, 2)
        run.save(out.partial)
        out.commit(drop=("checkpoint",))
    run.folder = out.path
    log.info("run saved to %s (%.1fs)", out.path, time.perf_counter() - started)
    return run


def _train(recipe: Recipe, folder: Path, state: dict | None, image_size: int, head, backbone, progress: bool,
           callbacks=(), evaluate_test: bool = True) -> Run:
    """Train (or go on training) in ``folder``, write the reports there and return the unsaved Run."""
    import keras

    from transferkit.models.surgery import average_over_views
    from transferkit.reports.evaluate import plot_history

    checkpoints = (Checkpoints if is_main_process() else ReadOnlyCheckpoints).of(folder)
    splits = check_data(recipe, screen=True)
    if splits.val is None:
        raise RecipeError("data.val: fine-tuning needs a validation split to monitor: "
                          "give a fraction (0.2) or a folder")
    class_names = splits.class_names
    batch_size = fitting_batch_size(recipe.data.batch_size, len(splits.train))
    with RecipeError.under("data"):  # this process's share of each batch (None: the only process)
        shard = start_in_step(state["epoch"] if state else 0, batch_size, train=len(splits.train), val=len(splits.val))
    precision = resolve_precision(recipe.precision)
    keras.utils.set_random_seed(recipe.seed)
    with distribution(recipe.distribute), dtype_policy(precision):
        model = build_model(recipe, len(class_names), image_size, head=head, backbone=backbone)
    log.info("model: %s + head, %d classes, %dpx, precision %s", recipe.backbone.name if backbone is None
             else backbone.name, len(class_names), image_size, precision)

    phases = plan_phases(recipe)
    with RecipeError.under("data.augment"):
        augment = build_augmentation(recipe.data.augment, seed=recipe.seed)
    placement = augment_placement(recipe.data.augment_on)
    if augment is not None:
        log.info("augmentation runs in the %s", "model (training step)" if placement == "model" else "input pipeline")
    val = make_dataset(splits.val, image_size, batch_size, num_classes=len(class_names), cache=recipe.data.cache,
                       shard=shard)
    trainer = Trainer(training_settings(recipe, head), model, checkpoints, folder, phases, val, state,
                      precision=precision, augment=augment if placement == "model" else None,
                      plot_history=plot_history, callbacks=callbacks)
    steps = steps_per_epoch(len(splits.train), batch_size, shard)
    check_optimizers(trainer, phases, steps)
    if state is not None:
        checkpoints.load_weights(model, state["epoch"])
        log.info("resuming after epoch %d of %d (%s)", state["epoch"], trainer.total, state["phase"])
    elif recipe.warmup.linear_probe:
        linear_probe(recipe, model, splits, image_size, progress)
    log.info("training in %s (moved to %s when complete)", folder, recipe.output)
    with distribution(recipe.distribute):
        for phase in phases:
            if trainer.epoch >= phase.last or trainer.stopped:
                continue
            train = train_dataset(recipe, phase, splits.train, image_size, batch_size, class_names,
                                  augment if placement == "pipeline" else None, first=trainer.epoch, shard=shard)
            train_phase(trainer, recipe, phase, train, steps, verbose=1 if progress and sys.stderr.isatty() else 0)
    trainer.finish()

    final = model if recipe.finetune.tta == "none" else average_over_views(model, recipe.finetune.tta)
    run = Run(recipe=recipe, class_names=class_names, image_size=image_size, predictor=KerasPredictor(final),
              history={**trainer.history, "phase": trainer.phases})
    diagnosis = _write_reports(run, trainer, splits, folder, batch_size, evaluate_test)
    run.info = _run_info(trainer, splits, precision, placement if augment is not None else None, diagnosis)
    track_run(run, folder, step=trainer.epoch * steps)
    return run


def _run_info(trainer: Trainer, splits, precision: str, augment_on: str | None, diagnosis) -> dict:
    """``Run.info`` of a fine-tuning run: its times, images, epochs, settings and diagnosis."""
    return {"seconds": {"train": round(trainer.seconds, 2)},
            "images": {name: len(images) for name, images in
                       (("train", splits.train), ("val", splits.val), ("test", splits.test)) if images},
            "epochs": len(trainer.phases), "precision": precision, "jit_compile": trainer.jit_compile,
            "parameters": trainer.parameters, "augment_on": augment_on, "early_stopping": trainer.early_stopping,
            "diagnosis": diagnosis.to_dict() if diagnosis else None}


def _write_reports(run: Run, trainer: Trainer, splits, folder: Path, batch_size: int, evaluate_test: bool = True):
    """The val and test reports (test only with ``evaluate_test``; their metrics into ``run``), after the
    temperature scaling fitted on val (folded into the run's model), and the diagnosis of the training
    curves, which is returned (None without a trained epoch)."""
    from transferkit.reports.calibration import write_calibrated_reports
    from transferkit.reports.evaluate import format_metrics
    from transferkit.training.diagnose import diagnose

    sets = {name: images for name, images in (("val", splits.val), ("test", splits.test if evaluate_test else None))
            if images is not None}
    raw = {name: (images.labels, run.model.predict(make_dataset(images, run.image_size, fitting_batch_size(
        batch_size, len(images), name)), verbose=0).astype("float64")) for name, images in sets.items()}
    if not is_main_process():  # the predictions are collective steps; process 0 writes the reports
        return None
    temperature, run.metrics = write_calibrated_reports(
        folder, raw, run.class_names, paths={name: images.paths for name, images in sets.items()},
        fit=run.recipe.calibrate == "temperature")
    run.predictor = run.predictor.with_temperature(temperature) if temperature != 1.0 else run.predictor
    for name, metrics in run.metrics.items():
        log.info("%s: %s", name, format_metrics(metrics))
    diagnosis = diagnose(trainer.history, trainer.phases) if trainer.phases else None
    if diagnosis is not None:
        atomic_write_text(folder / "diagnosis.txt", diagnosis.to_text() + "\n")
        log.info("%s", diagnosis.to_text())
    return diagnosis


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
    with RecipeError.under("head"):
        return attach_head(body, num_classes, **{**dataclasses.asdict(recipe.head),
                                                 "custom": recipe.head.custom if head is None else head})


def train_dataset(recipe: Recipe, phase: Phase, images, image_size: int, batch_size: int, class_names: list[str],
                  augment=None, first: int = 0, shard=None):
    """The phase's epochs from ``first`` on: shuffled one-hot batches, augmented by ``augment``;
    MixUp/CutMix after warm-up; imagined labels in imag episodes; with ``data.class_weight`` each
    sample weighed by its class (:func:`_label_weights`); ``data.sampling: balanced`` draws each label
    equally often (in imag episodes, each imagined label); with a ``shard``, this process's share of each
    batch. Each epoch's draws depend on the recipe's seed and the epoch alone (see
    :func:`transferkit.data.pipelines.make_dataset`)."""
    from transferkit.data.augment import BatchMixer

    trained = imagined(images, recipe, phase.episode) if phase.name == "imag" else images
    spec = recipe.finetune
    mix = (functools.partial(BatchMixer, spec.mixup, spec.cutmix)
           if phase.name != "warmup" and (spec.mixup or spec.cutmix) else None)
    return make_dataset(trained, image_size, batch_size, augment=augment, seed=recipe.seed,
                        num_classes=len(class_names), mix=mix, cache=recipe.data.cache,
                        epochs=range(max(first, phase.first), phase.last),
                        class_weight=_label_weights(recipe, phase, images, trained.labels),
                        balanced=recipe.data.sampling == BALANCED, shard=shard)


def _label_weights(recipe: Recipe, phase: Phase, images, targets: np.ndarray) -> np.ndarray | None:
    """The loss weight of each label the phase trains on: ``data.class_weight`` (``balanced``: counted
    on the training split ``images``); in an imag episode, where the images of a class learn
    ``targets`` instead, the weight of the class that carries each target.

    The pipeline gives the weights as sample weights (``Model.fit``'s ``class_weight`` weighs a
    MixUp/CutMix label as its largest class only): a mixed label weighs as its classes mix, label
    smoothing (inside the loss) leaves them be, and every backend and both pipelines read them."""
    weights = class_weights(recipe.data.class_weight, images.labels, images.class_names)
    if weights is None:
        return None
    weights = label_weights(weights, images.labels, targets)
    log.info("%s: loss weight per label: %s", phase.name,
             ", ".join(f"{name} {w:.3g}" for name, w in zip(images.class_names, weights)))
    return weights


def imagined(images, recipe: Recipe, episode: int):
    """``images`` with the imagined labels of imag episode ``episode`` (its own seeded permutation)."""
    from transferkit.training.imag import label_mapping

    with RecipeError.under("imag"):
        mapping = label_mapping(recipe.imag.mapping, images.class_names, seed=episode_seed(recipe.seed, episode))
    log.info("imag episode %d: %s", episode, ", ".join(f"{images.class_names[i]}->{images.class_names[j]}"
                                                      for i, j in enumerate(mapping) if i != j))
    return dataclasses.replace(images, labels=mapping[images.labels])


def linear_probe(recipe: Recipe, model, splits, image_size: int, progress: bool) -> None:
    """LP-FT: set ``head_logits`` to a logistic regression fitted on cached pooled features."""
    if process_count() > 1:
        raise RecipeError("warmup.linear_probe: not in a multi-host run (it caches features): use warmup.epochs")
    import keras

    from transferkit.features.classifiers import fit_cached, fold_linear_classifier
    from transferkit.io import transferkit_home
    from transferkit.recipe import ExtractSpec
    from transferkit.strategies.extract import cached_features, recipe_classifier
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
    classifier = recipe_classifier(probe, probe.extract.classifier, y, splits.class_names)
    classifier, _ = fit_cached(classifier, x, y, transferkit_home() / "classifiers")
    kernel, bias, classes = fold_linear_classifier(classifier, "logistic_regression")
    order = np.argsort(classes)
    model.get_layer("head_logits").set_weights([kernel[:, order].astype("float32"), bias[order].astype("float32")])
    log.info("warm-up: head initialised from a logistic regression on %d cached feature vectors (LP-FT)", len(x))
