"""Export a run as one Keras model: raw images -> class probabilities.

A fine-tuned run already is such a model. For an extract run, the run's `StandardScaler` and linear
classifier fold into a single `Dense` layer on top of the feature extractor, followed by a softmax,
so the exported model needs neither scikit-learn nor transferkit's predict code (the run's predictor
builds it: `transferkit.run.Predictor.keras_model`):

    z = W ((x - mean) / scale) + b = (W / scale) x + (b - W (mean / scale))

Besides the `.keras` file: a SavedModel folder or a `.tflite` file (TensorFlow backend), or an ONNX
file under any backend, by Keras' own exporter (tf2onnx under TensorFlow, jax2onnx under JAX,
torch.onnx under PyTorch; `pip install 'transferkit[onnx]'`), which ONNX Runtime runs: input `pixels`
(float32 `[N, S, S, 3]`, 0..255), output the probabilities. A mixed-precision run's model is exported
computing in float32, so its probabilities differ from the run's by bfloat16's rounding.

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
import logging
import warnings
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.io import atomic_path, atomic_write_json
from transferkit.outputs import folder_lock


FORMATS = {"keras": "model/model.keras", "saved_model": "export/saved_model", "tflite": "export/model.tflite",
           "onnx": "export/model.onnx"}
#: The formats only the TensorFlow backend writes.
TENSORFLOW_FORMATS = ("saved_model", "tflite")
#: What Keras' ONNX export needs under each backend (PyTorch's torch.onnx is built in), and how to install it.
ONNX_CONVERTERS = {"tensorflow": ("tf2onnx", "pip install 'transferkit[onnx]'"),
                   "jax": ("jax2onnx", "pip install 'transferkit[onnx-jax]' (Python >= 3.11)")}


def export_model(run, path: str | Path | None = None, format: str = "keras") -> Path:
    """Writes a run as one Keras model: a fine-tuned run's model, or an extract run's feature
    extractor and linear classifier folded together.

    The model takes raw RGB pixels (float32 `[N, S, S, 3]`, 0..255) and outputs the class
    probabilities of `transferkit.features.classifiers.predict_proba`, through a `Dense` layer named
    "classifier" and a softmax.

    Args:
        run: a `transferkit.run.Run`, or its run folder.
        path: where to write; default under the run folder: `model/model.keras`,
            `export/saved_model`, `export/model.tflite` or `export/model.onnx`. The class names go to
            `<stem>.classes.json` beside it.
        format: "keras", "onnx"; or, under the TensorFlow backend, "saved_model" (TF Serving) or "tflite".

    Returns:
        The path of the model file (written atomically).

    Raises:
        TransferkitError: an extract run's classifier is not linear (logistic_regression or
            linear_svm), an unknown format, one the backend cannot write or whose converter is not
            installed, or no path to write to.
    """
    import keras

    from transferkit.run import Run

    if format not in FORMATS:
        raise TransferkitError(f"unknown export format {format!r}: give one of {', '.join(FORMATS)}")
    if format in TENSORFLOW_FORMATS and keras.backend.backend() != "tensorflow":
        raise TransferkitError(f"{format} export needs the TensorFlow backend: run it with "
                               f"KERAS_BACKEND=tensorflow (now {keras.backend.backend()}), or export format keras")
    if format == "onnx":
        check_onnx_converter()
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
        elif format == "onnx":
            _export_onnx(model, path, run.image_size)
        else:
            _export_tensorflow(model, path, format)
    return path


def check_onnx_converter() -> None:
    """Raises TransferkitError, one line, when the converter Keras' ONNX export needs under this
    backend is not installed."""
    import importlib.util

    import keras

    backend = keras.backend.backend()
    package, install = ONNX_CONVERTERS.get(backend, (None, ""))
    if package is not None and importlib.util.find_spec(package) is None:
        raise TransferkitError(f"onnx export under the {backend} backend needs {package}: {install}")


def _export_onnx(model, path: Path, image_size: int) -> None:
    """An ONNX file by Keras' own exporter: input "pixels" (float32, any batch size), output the probabilities."""
    import keras

    spec = keras.InputSpec(shape=(None, image_size, image_size, 3), dtype="float32", name="pixels")
    with atomic_path(path) as tmp, _converters_quiet():
        _computing_in_float32(model).export(str(tmp), format="onnx", input_signature=[spec], verbose=False)


@contextlib.contextmanager
def _converters_quiet():
    """No log lines below warnings and no warnings while converting: tf2onnx, jax2onnx and torch.onnx's
    tracer tell each step (versions, opset, folded constants), which says nothing to the user."""
    before = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _computing_in_float32(model):
    """``model``, or when a layer of it computes in another precision (a mixed-precision run) a copy
    with its weights whose layers all compute in float32: ONNX Runtime runs few operators in bfloat16."""
    import keras

    def layers(parent):
        for layer in parent.layers:
            yield layer
            yield from layers(layer) if hasattr(layer, "layers") else ()

    if all(layer.dtype_policy.name == "float32" for layer in layers(model)):
        return model
    twin = keras.models.clone_model(
        model, recursive=True,
        clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": "float32"}))
    twin.set_weights(model.get_weights())
    return twin


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
