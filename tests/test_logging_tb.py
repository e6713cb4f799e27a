"""The recipe's log section: TensorBoard event files of real fine-tuning and extract runs (MobileNet alpha
0.25, 64 px), read back with TensorBoard's own reader; MLflow where it is installed; the validate errors."""

import json
import sys

import numpy as np
import pytest

from transferkit.errors import RecipeError
from transferkit.recipe import load_recipe
from transferkit.strategies import check_recipe
from transferkit.strategies.extract import extract
from transferkit.strategies.finetune import finetune


def make_recipe(data, output, strategy="finetune", **log):
    return load_recipe({
        "name": "cd-log", "seed": 0, "strategy": strategy,
        "data": {"train": str(data), "val": 0.25, "image_size": 64, "batch_size": 8},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "warmup": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "finetune": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-4}, "schedule": "cosine"},
        "extract": {"classifier": {"name": "logistic_regression", "grid": {}}},
        "log": log, "output": str(output)})


def events(folder):
    """TensorBoard's reader over one run folder of event files, everything kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return reader.Reload()


def scalars(reader, tag):
    return [(event.step, event.value) for event in reader.Scalars(tag)]


def logged_hparams(reader) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = reader.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


@pytest.fixture(scope="module")
def tensorboard_run(small_cats_dogs, home, tmp_path_factory):
    return finetune(make_recipe(small_cats_dogs, tmp_path_factory.mktemp("run") / "cd", tensorboard=True,
                                tensorboard_steps=2), progress=False)


@pytest.mark.slow
@pytest.mark.backends
def test_finetune_writes_the_history_per_epoch_and_step(tensorboard_run):
    from transferkit.training.schedules import build_schedule, learning_rate_at

    folder, history = tensorboard_run.folder, json.loads((tensorboard_run.folder / "history.json").read_text())
    train, validation = events(folder / "tensorboard" / "train"), events(folder / "tensorboard" / "validation")
    for reader, prefix in ((train, ""), (validation, "val_")):
        for key in ("loss", "accuracy"):  # the values of history.json, epoch by epoch
            assert scalars(reader, f"epoch_{key}") == [(epoch, np.float32(value)) for epoch, value in
                                                       enumerate(history[prefix + key], 1)], prefix + key
    assert [value for _, value in scalars(train, "epoch_learning_rate")] == list(np.float32(history["learning_rate"]))
    steps = 4  # 30 training images in batches of 8, for 2 epochs: every second step is logged
    assert [step for step, _ in scalars(train, "batch_loss")] == [2, 4, 6, 8]
    assert scalars(train, "batch_loss")[1][1] == np.float32(history["loss"][0])  # the epoch's last step: its mean
    cosine = build_schedule("cosine", 1e-4, epochs=1, steps_per_epoch=steps)  # fine-tuning's steps 5-8
    expected = [1e-3, 1e-3, learning_rate_at(cosine, 1), learning_rate_at(cosine, 3)]
    np.testing.assert_allclose([value for _, value in scalars(train, "batch_learning_rate")], expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.backends
def test_finetune_ends_with_the_confusion_matrix_metrics_and_recipe(tensorboard_run):
    summary = events(tensorboard_run.folder / "tensorboard")
    assert summary.Tags()["images"] == ["confusion_matrix/val"]
    image = summary.Images("confusion_matrix/val")[0]
    png = (tensorboard_run.folder / "val_confusion_matrix.png").read_bytes()
    assert image.step == 8 and image.encoded_image_string == png
    assert scalars(summary, "val/top1") == [(8, np.float32(tensorboard_run.metrics["val"]["top1"]))]
    hparams = logged_hparams(summary)
    assert hparams["finetune.optimizer.learning_rate"].number_value == pytest.approx(1e-4)
    assert hparams["backbone.name"].string_value == "mobilenet" and hparams["log.tensorboard"].bool_value
    assert hparams["data.augment"].string_value == "[]"  # lists as JSON
    assert "recipe" in summary.Tags()["tensors"]


class Crash(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_and_epoch_once(small_cats_dogs, home, tmp_path):
    import keras

    class CrashInTheSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 2:  # the first epoch is checkpointed, steps 5-7 of the second are done
                raise Crash()

    recipe = make_recipe(small_cats_dogs, tmp_path / "cd", tensorboard=True, tensorboard_steps=1)
    with pytest.raises(Crash):
        finetune(recipe, progress=False, callbacks=[CrashInTheSecondEpoch()])
    run = finetune(recipe, progress=False, resume=True)
    train = events(run.folder / "tensorboard" / "train")
    assert [step for step, _ in scalars(train, "batch_loss")] == list(range(1, 9))  # 2 epochs of 4 steps, once each
    assert scalars(train, "epoch_loss") == [(epoch, np.float32(value)) for epoch, value in
                                            enumerate(run.history["loss"], 1)]


@pytest.mark.slow
@pytest.mark.backends
def test_extract_writes_its_metrics_and_recipe_only(small_cats_dogs, home, tmp_path):
    run = extract(make_recipe(small_cats_dogs, tmp_path / "ex", strategy="extract", tensorboard=True), progress=False)
    assert [path.name for path in (run.folder / "tensorboard").iterdir() if path.is_dir()] == []  # no epochs
    summary = events(run.folder / "tensorboard")
    assert scalars(summary, "val/loss") == [(0, np.float32(run.metrics["val"]["loss"]))]
    assert summary.Tags()["images"] == ["confusion_matrix/val"]
    assert logged_hparams(summary)["strategy"].string_value == "extract"


@pytest.mark.parametrize("key, message", [
    ({"tensorboard": True}, "log.tensorboard: needs tensorboard: pip install 'transferkit[tensorboard]'"),
    ({"mlflow": "sqlite:///mlflow.db"}, "log.mlflow: needs mlflow: pip install mlflow"),
])
def test_validate_names_the_package_a_log_key_needs(small_cats_dogs, tmp_path, monkeypatch, key, message):
    monkeypatch.setitem(sys.modules, next(iter(key)), None)  # as if it were not installed
    with pytest.raises(RecipeError) as error:
        check_recipe(make_recipe(small_cats_dogs, tmp_path / "r", **key), weights=False)
    assert str(error.value) == message


@pytest.mark.slow
def test_mlflow_gets_the_params_metrics_and_report_files(small_cats_dogs, home, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="log.mlflow needs mlflow (pip install mlflow), an optional extra")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = finetune(make_recipe(small_cats_dogs, tmp_path / "ft", mlflow=uri), progress=False)
    client = MlflowClient(tracking_uri=uri)
    [logged] = client.search_runs([client.get_experiment_by_name("transferkit").experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "cd-log"
    assert logged.data.params["finetune.optimizer.name"] == "adam"
    assert [m.value for m in client.get_metric_history(logged.info.run_id, "val_loss")] == run.history["val_loss"]
    assert logged.data.metrics["val/top1"] == run.metrics["val"]["top1"]
    artifacts = {item.path for item in client.list_artifacts(logged.info.run_id)}
    assert {"recipe.yaml", "val_metrics.json", "val_confusion_matrix.png", "history.json"} <= artifacts
