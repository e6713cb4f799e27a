"""Export a run as one Keras model: raw images -> class probabilities.

A fine-tuned run already is such a model. For an extract run, the run's `StandardScaler` and linear
classifier fold into a single `Dense` layer on top of the feature extractor, followed by a softmax,
so the exported model needs neither scikit-learn nor transferkit's predict code (the run's predictor
builds it: `transferkit.run.Predictor.keras_model`):

    z = W ((x - mean) / scale) + b = (W / scale) x + (b - W (mean / scale))

The class names travel in a JSON file next to the model, `<stem>.classes.json`
(`{"class_names": [...], "image_size": S}`): any tool reads it, and the `.keras` file stays a plain
Keras model. `load_exported_model` reads both.

Example:
    >>> path = export_model("runs/flowers")            # runs/flowers/model/model.keras
    >>> model, class_names = load_exported_model(path)
    >>> model.predict(pixels)                           # float32 [N, S, S, 3] in 0..255
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.io import atomic_path, atomic_write_json
from transferkit.outputs import folder_lock


FORMATS = {"keras": "model/model.keras", "saved_model": "export/saved_model", "tflite": "export/model.tflite"}


def export_model(run, path: str | Path | None = None, format: str = "keras") -> Path:
    """Writes a run as one Keras model: a fine-tuned run's model, or an extract run's feature
    extractor and linear classifier folded together.

    The model takes raw RGB pixels (float32 `[N, S, S, 3]`, 0..255) and outputs the class
    probabilities of `transferkit.features.classifiers.predict_proba`, through a `Dense` layer named
    "classifier" and a softmax.

    Args:
        run: a `transferkit.run.Run`, or its run folder.
        path: where to write; default under the run folder: `model/model.keras`,
            `export/saved_model` or `export/model.tflite`. The class names go to
            `<stem>.classes.json` beside it.
        format: "keras"; or, under the TensorFlow backend, "saved_model" (TF Serving) or "tflite".

    Returns:
        The path of the model file (written atomically).

    Raises:
        TransferkitError: an extract run's classifier is not linear (logistic_regression or
            linear_svm), an unknown format or one the backend cannot write, or no path to write to.
    """
    import keras

    from transferkit.run import Run

    if format not in FORMATS:
        raise TransferkitError(f"unknown export format {format!r}: give one of {', '.join(FORMATS)}")
    if format != "keras" and keras.backend.backend() != "tensorflow":
        raise TransferkitError(f"{format} export needs the TensorFlow backend: run it with "
                               f"KERAS_BACKEND=tensorflow (now {keras.backend.backend()}), or export format keras")
    run = run if isinstance(run, Run) else Run.load(run)
    if path is None and run.folder is None:
        raise TransferkitError("this run has no folder yet: save it, or give export_model a path")
    path = Path(path or Path(run.folder) / FORMATS[format])
    if format == "keras" and path.suffix != ".keras":
        raise TransferkitError(f"export path {path} must end in .keras")

    model, classes = run.predictor.keras_model(run.recipe.extract.classifier.name)
    class_names = [run.class_names[c] for c in classes]

    inside_run = run.folder is not None and path.resolve().is_relative_to(Path(run.folder).resolve())
    with folder_lock(run.folder) if inside_run else contextlib.nullcontext():  # not while a run replaces it
        atomic_write_json(_classes_path(path), {"class_names": class_names, "image_size": run.image_size})
        if format == "keras":
            with atomic_path(path) as tmp:
                model.save(tmp)
        else:
            _export_tensorflow(model, path, format)
    return path


def _export_tensorflow(model, path: Path, format: str) -> None:
    """A SavedModel folder or a .tflite file (built from a SavedModel), replacing any earlier one."""
    import shutil
    import tempfile

    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        if format == "saved_model":
            shutil.rmtree(path, ignore_errors=True)
            saved.rename(path)
        else:
            with atomic_path(path) as out:
                out.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())


def load_exported_model(path: str | Path):
    """Loads a model written by `export_model`, with its class names.

    Returns:
        `(keras.Model, class_names)`.
    """
    import keras

    import transferkit.models.layers  # noqa: F401  (registers Preprocess for deserialisation)

    path = Path(path)
    return keras.saving.load_model(path, safe_mode=True), json.loads(_classes_path(path).read_text())["class_names"]


def _classes_path(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.classes.json")
