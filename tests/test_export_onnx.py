"""ONNX export of real fine-tuning and extract runs (MobileNet alpha 0.25, 64 px): ONNX Runtime gives the
run's own (calibrated) probabilities; a missing converter is one line naming what to install."""

import json
import sys

import numpy as np
import pytest

from transferkit.data.decode import load_images
from transferkit.errors import TransferkitError
from transferkit.export import ONNX_CONVERTERS, export_model
from transferkit.recipe import load_recipe
from transferkit.strategies.extract import extract
from transferkit.strategies.finetune import finetune

pytestmark = [pytest.mark.slow, pytest.mark.backends]


def converter() -> str | None:
    """The package Keras' ONNX export needs under the current backend (None: built in)."""
    import keras

    return ONNX_CONVERTERS.get(keras.backend.backend(), (None,))[0]


@pytest.fixture(scope="module")
def onnx_runtime():
    """ONNX Runtime, with the converter the backend needs; the tests skip, saying why, without them."""
    if converter() is not None:
        pytest.importorskip(converter(), reason=f"onnx export under this backend needs {converter()}")
    return pytest.importorskip("onnxruntime", reason="running the exported model needs pip install "
                                                     "'transferkit[onnx]'")


@pytest.fixture(scope="module")
def runs(small_cats_dogs, home, tmp_path_factory):
    """strategy -> a finished run on 15 cats and 15 dogs."""
    def recipe(strategy):
        return load_recipe({
            "name": f"cd-{strategy}", "seed": 0, "strategy": strategy,
            "data": {"train": str(small_cats_dogs), "val": 0.25, "image_size": 64, "batch_size": 8},
            "backbone": {"name": "mobilenet", "alpha": 0.25},
            "warmup": {"epochs": 1}, "finetune": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-4}},
            "extract": {"classifier": {"name": "logistic_regression", "grid": {}}},
            "output": str(tmp_path_factory.mktemp("runs") / strategy)})
    return {"finetune": finetune(recipe("finetune"), progress=False), "extract": extract(recipe("extract"),
                                                                                          progress=False)}


@pytest.fixture(scope="module")
def held_out(datasets):
    return [str(path) for cls in ("cat", "dog") for path in sorted((datasets / "cats_dogs" / cls).iterdir())[20:22]]


def onnx_probabilities(onnx_runtime, path, images):
    session = onnx_runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [item.name for item in session.get_inputs()] == ["pixels"]
    return session.run(None, {"pixels": images})[0]


@pytest.mark.parametrize("strategy", ["finetune", "extract"])
def test_onnx_runtime_gives_the_runs_probabilities(onnx_runtime, runs, held_out, strategy):
    run = runs[strategy]
    path = export_model(run, format="onnx")
    assert path == run.folder / "export" / "model.onnx" and path.is_file()
    assert json.loads((path.parent / "model.classes.json").read_text()) == {"class_names": ["cat", "dog"],
                                                                            "image_size": 64}
    images = load_images(held_out, 64).astype("float32")
    exported = onnx_probabilities(onnx_runtime, path, images)
    np.testing.assert_allclose(exported, run.predict(held_out), atol=1e-4)
    assert np.abs(exported - uncalibrated(run, images)).max() > 0.01  # the temperature is in it, and matters
    assert len(onnx_probabilities(onnx_runtime, path, images[:1])) == 1  # any batch size


def uncalibrated(run, images):
    """The run's probabilities before its calibration temperature."""
    import keras

    if run.recipe.strategy == "extract":
        return run.predictor.with_temperature(1.0).predict(images, 16)
    return keras.Model(run.model.input, run.model.get_layer("temperature").input).predict(images, verbose=0)


def test_a_missing_converter_is_one_line_naming_what_to_install(runs, monkeypatch, in_process, tmp_path):
    if converter() is None:
        pytest.skip("this backend's ONNX export is built in")
    monkeypatch.setitem(sys.modules, converter(), None)  # as if it were not installed
    with pytest.raises(TransferkitError, match=rf"^onnx export under the \w+ backend needs {converter()}: pip install"):
        export_model(runs["extract"], tmp_path / "model.onnx", format="onnx")
    code, _, error = in_process("export", runs["extract"].folder, "--format", "onnx", "--output", tmp_path / "m.onnx")
    assert code == 2 and len(error.strip().splitlines()) == 1 and converter() in error
    assert list(tmp_path.iterdir()) == []


def test_a_mixed_precision_model_is_exported_computing_in_float32(onnx_runtime, runs, held_out, tmp_path):
    import keras

    from transferkit.predictors import KerasPredictor
    from transferkit.run import Run

    run = runs["finetune"]
    mixed = keras.models.clone_model(run.model, recursive=True, clone_function=lambda layer: layer.__class__.from_config(
        {**layer.get_config(), "dtype": "mixed_bfloat16"}))  # as a run trained with precision: mixed_bfloat16
    mixed.set_weights(run.model.get_weights())
    path = export_model(Run(run.recipe, run.class_names, run.image_size, KerasPredictor(mixed)), tmp_path / "m.onnx",
                        format="onnx")
    exported = onnx_probabilities(onnx_runtime, path, load_images(held_out, 64).astype("float32"))
    np.testing.assert_allclose(exported, run.predict(held_out), atol=1e-4)  # the same weights, in float32
