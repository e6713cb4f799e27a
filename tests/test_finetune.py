"""The fine-tuning strategy end to end on real images and ImageNet weights (MobileNet alpha 0.25, 128 px)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from transferkit.models.backbones import create_backbone
from transferkit.errors import DeviceMemoryError, RecipeError
from transferkit.recipe import DenseSpec, load_recipe
from transferkit.run import Run
from transferkit.strategies.extract import extract
from transferkit.data.decode import load_images
from transferkit.models.layers import CROP_CORNERS
from transferkit.strategies.finetune import finetune
from transferkit.training.trainer import TrainingError
from transferkit.models.surgery import body_layers

pytestmark = [pytest.mark.slow, pytest.mark.backends]


def make_recipe(data, output, warmup=1, epochs=1, **finetune_keys):
    return load_recipe({
        "name": "cd-ft", "seed": 0, "strategy": "finetune",
        "data": {"train": str(data), "val": 0.25, "image_size": 128, "batch_size": 8},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "warmup": {"epochs": warmup, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "finetune": {"epochs": epochs, "optimizer": {"name": "adam", "learning_rate": 1e-3}, **finetune_keys},
        "output": str(output)})


@pytest.fixture(scope="module")
def pretrained():
    """Layer name -> ImageNet weights of the backbone the runs start from."""
    body = create_backbone("mobilenet", image_size=128, alpha=0.25)
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in body.layers}


@pytest.fixture(scope="module")
def first_run(small_cats_dogs, home, tmp_path_factory):
    recipe = make_recipe(small_cats_dogs, tmp_path_factory.mktemp("run"), warmup=1, epochs=1,
                         unfreeze={"from": "conv_dw_13"})
    return finetune(recipe, progress=False)


def changed_layers(model, pretrained):
    """Names of the body layers whose weights differ from the ImageNet ones."""
    return [layer.name for layer in body_layers(model) if layer.weights and not all(
        np.array_equal(a, b) for a, b in zip(layer.get_weights(), pretrained[layer.name]))]


def test_finetune_writes_the_run_folder_and_reloads(first_run, small_cats_dogs):
    import keras

    from transferkit.training.accelerator import gpu_available

    folder = first_run.folder
    for name in ["run.json", "recipe.yaml", "model/model.keras", "history.json", "history.csv", "curves.png",
                 "diagnosis.txt", "val_metrics.json", "val_confusion_matrix.png", "val_predictions.csv"]:
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoint").exists()  # a finished run keeps no checkpoint
    history = json.loads((folder / "history.json").read_text())
    assert history["phase"] == ["warmup", "finetune"] and len(history["val_loss"]) == 2
    assert (folder / "history.csv").read_text().splitlines()[0].startswith("epoch,phase,")
    summary = json.loads((folder / "run.json").read_text())
    assert summary["strategy"] == "finetune" and summary["info"]["diagnosis"]["verdict"]
    assert summary["info"]["jit_compile"] == (keras.backend.backend() == "jax" or gpu_available())  # XLA: auto
    assert summary["info"]["parameters"]["warmup"]["trainable"] < summary["info"]["parameters"]["finetune"]["trainable"]
    paths = sorted(str(p) for p in (small_cats_dogs / "dog").iterdir())[:4]
    loaded = Run.load(folder)
    assert loaded.class_names == ["cat", "dog"] and loaded.model is not None
    np.testing.assert_allclose(loaded.predict(paths), first_run.predict(paths), atol=1e-5)
    assert loaded.evaluate()["top1"] == first_run.metrics["val"]["top1"]
    assert (folder / "val_reliability.png").is_file() and first_run.metrics["val"]["ece"] >= 0
    temperature = first_run.metrics["val"].get("calibration", {}).get("temperature")  # none where 1.0 fits best
    assert ("temperature" in [layer.name for layer in loaded.model.layers]) == (temperature is not None)


def test_predict_and_export_commands_work_on_a_finetuned_run(first_run, small_cats_dogs):
    from test_cli import transferkit

    from transferkit.export import load_exported_model

    result = transferkit("predict", first_run.folder, small_cats_dogs / "cat", "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 20
    assert transferkit("export", first_run.folder).returncode == 0
    model, class_names = load_exported_model(first_run.folder / "model" / "model.keras")
    assert class_names == ["cat", "dog"] and model.output.shape[-1] == 2
    paths = sorted(str(p) for p in (small_cats_dogs / "cat").iterdir())[:4]
    exported = model.predict(load_images(paths, 128).astype("float32"), verbose=0)
    np.testing.assert_allclose(exported, first_run.predict(paths), atol=1e-5)  # calibrated, as the run predicts


def test_only_layers_from_the_named_one_change_and_batchnorm_stays(first_run, pretrained):
    changed = changed_layers(first_run.model, pretrained)
    names = [layer.name for layer in body_layers(first_run.model)]
    assert changed and all(names.index(name) >= names.index("conv_dw_13") for name in changed)
    assert not any("bn" in name for name in changed)  # frozen BatchNorm: no statistics updates either
    assert set(changed) == {"conv_dw_13", "conv_pw_13"}


def test_warmup_changes_no_backbone_weight(small_cats_dogs, home, tmp_path, pretrained):
    run = finetune(make_recipe(small_cats_dogs, tmp_path, warmup=2, epochs=0), progress=False)
    assert run.history["phase"] == ["warmup", "warmup"]
    assert changed_layers(run.model, pretrained) == []
    assert run.history["loss"][1] < run.history["loss"][0]  # the head itself did learn


def test_train_batchnorm_updates_statistics_only_when_asked(small_cats_dogs, home, tmp_path, pretrained):
    run = finetune(make_recipe(small_cats_dogs, tmp_path, warmup=0, epochs=1,
                               unfreeze={"from": "conv_dw_13", "train_batchnorm": True}), progress=False)
    assert {"conv_dw_13_bn", "conv_pw_13_bn"} <= set(changed_layers(run.model, pretrained))


def test_batchnorm_momentum_sets_the_trained_batchnorm_layers_momentum(small_cats_dogs, home, tmp_path, pretrained):
    import keras

    unfreeze = {"from": "conv_dw_13", "train_batchnorm": True, "batchnorm_momentum": 0.5}
    run = finetune(make_recipe(small_cats_dogs, tmp_path, warmup=0, epochs=1, unfreeze=unfreeze), progress=False)
    momenta = {layer.name: layer.momentum for layer in Run.load(run.folder).model.layers
               if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta["conv_dw_13_bn"] == momenta["conv_pw_13_bn"] == 0.5 and momenta["conv_dw_12_bn"] != 0.5
    with pytest.raises(RecipeError, match="batchnorm_momentum: acts only on BatchNorm layers that train"):
        make_recipe(small_cats_dogs, tmp_path, unfreeze={"all": True, "batchnorm_momentum": 0.9})


def tiny_head(features, num_classes):
    import keras
    x = keras.layers.Dense(16, activation="gelu", name="custom_hidden")(features)
    return keras.layers.Dense(num_classes, activation="softmax", name="custom_out")(x)


def test_a_backbone_function_starts_from_the_seeds_weights(small_cats_dogs, home, tmp_path):
    import keras

    def tiny_cnn():
        inputs = keras.Input((32, 32, 3))
        return keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=4)(keras.layers.Rescaling(1 / 255.0)(inputs)))

    histories = []
    for attempt in range(2):
        np.random.default_rng().random()  # whatever the global state before the run
        keras.utils.set_random_seed(1000 + attempt)
        recipe = make_recipe(small_cats_dogs, tmp_path / str(attempt), warmup=1, epochs=0)
        recipe.data.image_size = 32
        histories.append(finetune(recipe, backbone=tiny_cnn, progress=False).history["loss"])
    assert histories[0] == histories[1]


def test_custom_head_from_the_api_trains(small_cats_dogs, home, tmp_path):
    run = finetune(make_recipe(small_cats_dogs, tmp_path, warmup=1, epochs=0), head=tiny_head, progress=False)
    names = [layer.name for layer in run.model.layers if layer.name != "temperature"]  # calibration's, after
    assert names[-3:] == ["custom_hidden", "custom_out", "probabilities"]
    assert np.isfinite(run.history["loss"]).all()
    assert Run.load(run.folder).predict(np.zeros((1, 128, 128, 3), "float32")).shape == (1, 2)


def test_custom_head_from_a_recipe_import_path_trains(small_cats_dogs, home, tmp_path, monkeypatch):
    (tmp_path / "recipe_heads.py").write_text(textwrap.dedent("""
        import keras

        def wide(features, num_classes):
            return keras.layers.Dense(num_classes, activation="softmax", name="wide_out")(features)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = make_recipe(small_cats_dogs, tmp_path / "run", warmup=1, epochs=0)
    recipe.head.custom = "recipe_heads:wide"
    run = finetune(recipe, progress=False)
    assert "wide_out" in [layer.name for layer in run.model.layers]
    assert np.isfinite(run.history["loss"]).all()


def test_linear_probe_starts_the_head_from_logistic_regression(small_cats_dogs, home, tmp_path):
    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=3, epochs=0)
    recipe.warmup.linear_probe = True
    run = finetune(recipe, progress=False)
    assert run.history["phase"] == []  # LP-FT replaces the warm-up epochs; no training at all here
    # The head is the extract strategy's logistic regression on the same (cached) features.
    probe = load_recipe({**recipe.to_dict(), "strategy": "extract", "output": str(tmp_path / "probe"),
                         "extract": {"layer": "top", "tta": False, "power_norm": False}})
    extracted = extract(probe, progress=False)
    paths = [row.split(",")[0] for row in (run.folder / "val_predictions.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(run.predict(paths), extracted.predict(paths), atol=1e-4)


def test_linear_probe_needs_a_linear_head(small_cats_dogs, home, tmp_path):
    from transferkit.errors import RecipeError

    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=1, epochs=0)
    recipe.warmup.linear_probe, recipe.head.layers = True, [DenseSpec(dense=8)]
    with pytest.raises(RecipeError, match="warmup.linear_probe: needs the built-in head without hidden layers"):
        finetune(recipe, progress=False)


def nan_head(features, num_classes):
    import keras
    return keras.layers.Dense(num_classes, activation="softmax",
                              kernel_initializer=keras.initializers.Constant(float("nan")))(features)


def test_a_nan_loss_stops_with_what_to_try(small_cats_dogs, home, tmp_path):
    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=2, epochs=0)
    with pytest.raises(TrainingError, match=r"the loss became nan in epoch 1 \(warmup\): lower "
                                            r"warmup.optimizer.learning_rate \(now 0.001\)"):
        finetune(recipe, head=nan_head, progress=False)
    # the NaN epoch was never recorded: nothing is left that would block the next plain run
    assert not tmp_path.with_name(f"{tmp_path.name}.partial").exists() and not (tmp_path / "history.json").exists()


def test_mixup_cutmix_label_smoothing_and_schedule_options_train(small_cats_dogs, home, tmp_path):
    run = finetune(make_recipe(small_cats_dogs, tmp_path, warmup=0, epochs=2, mixup=0.2, cutmix=1.0,
                               label_smoothing=0.1, layer_decay=0.8, unfreeze={"top_blocks": 2},
                               schedule={"name": "sgdr", "restart_epochs": 1}), progress=False)
    assert np.isfinite(run.history["loss"]).all() and len(run.history["learning_rate"]) == 2


@pytest.mark.parametrize("augment_on", [None, "model"])  # "model": fit trains a model wrapping the run's
def test_early_stopping_stops_and_restores_the_best_epoch(small_cats_dogs, home, tmp_path, augment_on):
    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=0, epochs=6,
                         early_stopping={"monitor": "val_accuracy", "patience": 1, "min_delta": 0.5})
    if augment_on:
        recipe.data.augment, recipe.data.augment_on = ["random_flip"], augment_on
    run = finetune(recipe, progress=False)
    # min_delta 0.5 makes every epoch after the first "no improvement": it stops after epoch 2
    assert run.history["phase"] == ["finetune", "finetune"]
    assert run.info["early_stopping"] == {"best": run.history["val_accuracy"][0], "best_epoch": 1,
                                          "wait": 1, "stopped": True}


def test_kill_then_resume_runs_each_epoch_exactly_once(small_cats_dogs, home, tmp_path):
    from test_cli import ROOT, assert_one_line_error, transferkit

    recipe = make_recipe(small_cats_dogs, tmp_path / "run", warmup=2, epochs=4)
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    state = tmp_path / "run.partial" / "checkpoint" / "state.json"  # the run is written beside its folder
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "finetune", str(tmp_path / "recipe.yaml"),
                                "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 3:  # inside fine-tuning
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = json.loads(state.read_text())
    assert 3 <= before["epoch"] < 6, "the run finished before it could be killed"

    assert_one_line_error(transferkit("finetune", tmp_path / "recipe.yaml"), "unfinished run", "--resume")
    result = transferkit("finetune", tmp_path / "recipe.yaml", "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"resuming after epoch {before['epoch']} of 6" in result.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["phase"] == ["warmup"] * 2 + ["finetune"] * 4
    assert history["loss"][:before["epoch"]] == before["history"]["loss"]  # kept, not re-run
    assert not state.exists() and not (tmp_path / "run.partial").exists()


def test_finetune_command_rejects_an_extract_recipe(tmp_path, small_cats_dogs):
    from test_cli import assert_one_line_error, transferkit

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": str(small_cats_dogs)}, "strategy": "extract"}))
    assert_one_line_error(transferkit("finetune", path), "strategy is extract", "transferkit extract")


def test_saved_model_and_tflite_exports_agree_with_the_run(first_run):
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("SavedModel and TFLite export need the TensorFlow backend")
    import tensorflow as tf

    from transferkit.export import export_model

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 128, 128, 3)).astype("float32")
    expected = first_run.predict(pixels)
    saved = tf.saved_model.load(str(export_model(first_run, format="saved_model")))
    np.testing.assert_allclose(saved.serve(pixels).numpy(), expected, atol=1e-4)
    interpreter = tf.lite.Interpreter(model_path=str(export_model(first_run, format="tflite")))
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), expected, atol=1e-4)
    assert json.loads((first_run.folder / "export" / "model.classes.json").read_text())["class_names"] == ["cat", "dog"]


def test_mixed_precision_keeps_probabilities_in_float32(small_cats_dogs, home, tmp_path):
    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=1, epochs=0)
    recipe.precision, recipe.jit_compile = "mixed_bfloat16", False
    run = finetune(recipe, progress=False)
    assert run.info["jit_compile"] is False  # the recipe overrides XLA's default
    assert run.model.get_layer("head_logits").dtype_policy.name == "mixed_bfloat16"
    assert run.model.output.dtype == "float32" and np.isfinite(run.history["loss"]).all()
    assert run.info["precision"] == "mixed_bfloat16"


def test_out_of_memory_says_which_batch_size_to_try(small_cats_dogs, home, tmp_path, monkeypatch):
    import keras

    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes.")
    monkeypatch.setattr(keras.Model, "fit", exhausted)
    with pytest.raises(DeviceMemoryError, match=r"out of memory at data.batch_size 8 \(warmup, 128 px\): lower it, "
                                                r"e.g. --set data.batch_size=4, or use precision: mixed_bfloat16$"):
        finetune(make_recipe(small_cats_dogs, tmp_path), progress=False)
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: (_ for _ in ()).throw(ValueError("shapes differ")))
    with pytest.raises(ValueError, match="shapes differ"):  # anything else is not dressed up
        finetune(make_recipe(small_cats_dogs, tmp_path, warmup=1), restart=True, progress=False)


def test_augmentation_in_the_model_acts_in_training_only(small_cats_dogs, home, tmp_path):
    import keras

    from transferkit.data.augment import build_augmentation
    from transferkit.training.accelerator import augment_placement, gpu_available
    from transferkit.training.trainer import with_augmentation

    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=1, epochs=1)
    recipe.data.augment, recipe.data.augment_on = ["random_flip", {"random_rotation": 0.2}], "model"
    run = finetune(recipe, progress=False)
    assert run.info["augment_on"] == "model" and np.isfinite(run.history["loss"]).all()
    assert all("augment" not in layer.name for layer in Run.load(run.folder).model.layers)  # the saved model is plain
    inputs = keras.Input((128, 128, 3))
    identity = keras.Model(inputs, keras.layers.Rescaling(1.0)(inputs))
    wrapped = with_augmentation(identity, build_augmentation(recipe.data.augment, seed=0))
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 128, 128, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(wrapped(pixels, training=False)), pixels)
    assert np.abs(np.asarray(wrapped(pixels, training=True)) - pixels).mean() > 10  # flipped and rotated
    assert augment_placement("pipeline") == "pipeline" and augment_placement("model") == "model"
    assert augment_placement("auto") == ("model" if gpu_available() else "pipeline")


def test_on_a_gpu_auto_picks_bfloat16_and_augmentation_in_the_model(small_cats_dogs, home, tmp_path, monkeypatch):
    from transferkit.training import accelerator

    monkeypatch.setattr(accelerator, "gpu_available", lambda: True)  # what the GPU defaults hang on
    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=1, epochs=0)
    recipe.data.augment = ["random_flip"]
    run = finetune(recipe, progress=False)
    assert run.info["precision"] == "mixed_bfloat16" and run.info["augment_on"] == "model"
    assert run.model.get_layer("head_logits").dtype_policy.name == "mixed_bfloat16"
    assert np.isfinite(run.history["loss"]).all()


@pytest.mark.parametrize("tta, views", [("flip", ["flip"]), ("crops", [f"crop_{c}" for c in
                                                                      ("center", "top_left", "bottom_right")])])
def test_test_time_augmentation_averages_views_inside_the_saved_model(small_cats_dogs, home, tmp_path, tta, views):
    import keras

    recipe = make_recipe(small_cats_dogs, tmp_path, warmup=1, epochs=0, tta=tta)
    recipe.calibrate = "none"  # the plain average, to compare with the views by hand
    run = finetune(recipe, progress=False)
    model = Run.load(run.folder).model
    names = [layer.name for layer in model.layers]
    assert f"{tta}_average" in names and all(view in names for view in views)
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    pixels = load_images(sorted(str(p) for p in (small_cats_dogs / "cat").iterdir())[:3], 128).astype("float32")
    seen = ([pixels, model.get_layer("flip")(pixels)] if tta == "flip"
            else [model.get_layer(f"crop_{corner}")(pixels) for corner in CROP_CORNERS])
    by_hand = np.mean([inner.predict(np.asarray(view), verbose=0) for view in seen], axis=0)
    np.testing.assert_allclose(model.predict(pixels, verbose=0), by_hand, atol=1e-5)


def test_crop_views_take_the_corner_asked_for():
    from transferkit.models.layers import CropResize

    image = np.zeros((1, 8, 8, 3), "float32")
    image[:, :4, :4] = 7.0  # the top-left quadrant
    np.testing.assert_allclose(np.asarray(CropResize("top_left", 0.5)(image)), 7.0)
    np.testing.assert_allclose(np.asarray(CropResize("bottom_right", 0.5)(image)), 0.0)
    np.testing.assert_allclose(np.asarray(CropResize("center", 1.0)(image)), image)
    with pytest.raises(ValueError, match="corner"):
        CropResize("middle")
