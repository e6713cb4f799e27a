"""Multi-host fine-tuning (JAX's multi-controller runtime): two local processes on the CPU through a
localhost coordinator train as one process does with the same global batch, process 0 alone writes,
and a run stopped after its first epoch resumes across both processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import yaml

from conftest import copy_first_images

from transferkit.data.shards import Shard
from transferkit.training.multihost import JAX_ONLY

pytestmark = [pytest.mark.slow, pytest.mark.backends]
under_jax = pytest.mark.skipif(keras.backend.backend() != "jax",
                               reason="multi-host training runs under KERAS_BACKEND=jax only (CI's JAX step runs it)")

RECIPE = {"seed": 0, "strategy": "finetune", "calibrate": "none",
          "data": {"val": 0.25, "image_size": 64, "batch_size": 4},  # 12 train and 4 val images: 2 per process
          "backbone": {"name": "mobilenet", "alpha": 0.25}, "head": {"dropout": 0.0}, "warmup": {"epochs": 0},
          "finetune": {"epochs": 2, "unfreeze": {"from": "conv_dw_13"},
                       "optimizer": {"name": "adam", "learning_rate": 0.001}, "schedule": {"name": "constant"}}}

# Trains the recipe (one process, or one of several); "stop" ends the run after its first epoch's checkpoint.
SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe_file, processes, process, port, mode = sys.argv[1:]
    from transferkit.training import multihost
    if int(processes) > 1:
        multihost.initialize(f"localhost:{port}", int(processes), int(process))
    import keras
    from transferkit.strategies.finetune import finetune

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError(f"planned stop after epoch {epoch + 1}")

    run = finetune(recipe_file, progress=False, callbacks=[Stop()] if mode == "stop" else [])
    print(json.dumps({"folder": str(run.folder), "loss": run.history["loss"]}))
""")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _processes(commands: list[list[str]], timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Runs the commands at once; on a timeout (a hung collective) kills them all and fails with their stderr."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for command in commands]
    try:
        outputs = [process.communicate(timeout=timeout) for process in running]
    except subprocess.TimeoutExpired:
        for process in running:
            process.kill()
        errors = [process.communicate()[1][-3000:] for process in running]
        pytest.fail(f"processes still running after {timeout}s, killed:\n" + "\n----\n".join(errors))
    return [subprocess.CompletedProcess(command, process.returncode, out, err)
            for command, process, (out, err) in zip(commands, running, outputs)]


def _head_kernel(folder) -> np.ndarray:
    from transferkit.run import Run

    return Run.load(folder).model.get_layer("head_logits").get_weights()[0]


@pytest.fixture(scope="module")
def cats_dogs16(datasets, tmp_path_factory):
    """8 cats and 8 dogs."""
    return copy_first_images(datasets / "cats_dogs", tmp_path_factory.mktemp("cats_dogs16"), 8)


@under_jax
def test_two_processes_train_as_one_and_resume_together(cats_dogs16, home, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    recipes = {}
    for name in ("single", "multi"):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump({**RECIPE, "output": str(tmp_path / name),
                                                 "data": {**RECIPE["data"], "train": str(cats_dogs16)}}))
    port = _free_port()  # the one-process run beside two processes that stop after their first epoch
    single, *stopped = _processes([[sys.executable, str(script), str(recipes["single"]), "1", "0", "0", "plain"]] + [
        [sys.executable, str(script), str(recipes["multi"]), "2", str(i), str(port), "stop"] for i in range(2)])
    assert single.returncode == 0, single.stderr[-3000:]
    for process in stopped:
        assert process.returncode != 0 and "planned stop after epoch 1" in process.stderr, process.stderr[-3000:]
    state = json.loads((tmp_path / "multi.partial" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1

    port = _free_port()
    resumed = _processes([[sys.executable, "-m", "transferkit", "finetune", str(recipes["multi"]), "--resume",
                           "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
                          for i in range(2)])
    for process in resumed:
        assert process.returncode == 0, process.stderr[-3000:]
    assert f"run folder: {tmp_path / 'multi'}" in resumed[0].stdout
    assert "process 0 writes the run folder" in resumed[1].stdout
    assert "resuming after epoch 1 of 2" in resumed[0].stderr
    assert "multi-host run: 2 processes, 2 devices" in resumed[0].stderr
    assert "epoch 2/2" not in resumed[1].stderr  # process 0 alone logs the run

    one, two = (json.loads((tmp_path / name / "history.json").read_text()) for name in ("single", "multi"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert _head_kernel(tmp_path / "multi").ravel() == pytest.approx(_head_kernel(tmp_path / "single").ravel(),
                                                                     rel=1e-3, abs=1e-5)
    assert not (tmp_path / "multi.partial").exists()


def test_each_process_takes_its_share_of_a_global_batch():
    first, second = Shard(index=0, count=2, devices=4), Shard(index=1, count=2, devices=4)
    batch = list(range(10, 20))  # 10 images over 4 devices: 8 used, 4 per process
    assert first.take(batch) == [10, 11, 12, 13] and second.take(batch) == [14, 15, 16, 17]
    assert first.batches(count=23, batch_size=8) == 3 and first.used(count=23, batch_size=8) == 20
    assert first.batches(count=19, batch_size=8) == 2 and first.used(count=19, batch_size=8) == 16


def test_each_process_decodes_its_share_of_the_same_batches(cats_dogs16):
    from transferkit.data.folders import scan_folder
    from transferkit.data.pipelines import make_dataset, steps_per_epoch

    images = scan_folder(cats_dogs16, screen=False)  # 16 images in batches of 7, 7 and 2 per epoch
    whole = make_dataset(images, 16, 7, epochs=range(2), pipeline="pydataset", num_classes=2)
    shards = [Shard(index=i, count=2, devices=2) for i in range(2)]
    parts = [make_dataset(images, 16, 7, epochs=range(2), pipeline="pydataset", num_classes=2, shard=shard)
             for shard in shards]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 2 * steps_per_epoch(16, 7, shards[0]) == 6
    for index in range(len(whole)):
        (x, y), (x0, y0), (x1, y1) = whole[index], parts[0][index], parts[1][index]
        used = len(x) - len(x) % 2  # 6 of 7, 2 of 2: each process as many
        assert len(x0) == len(x1) == used // 2
        assert np.array_equal(np.concatenate([x0, x1]), x[:used]) and np.array_equal(np.concatenate([y0, y1]), y[:used])
    with pytest.raises(ValueError, match="pydataset pipeline only"):
        make_dataset(images, 16, 7, pipeline="tf", shard=shards[0])


def test_each_share_of_a_batch_draws_its_own_mixing(cats_dogs16):
    from transferkit.data.folders import scan_folder
    from transferkit.data.pipelines import make_dataset

    def seed_as_labels(seed):  # a "mixer" that shows the seed it was given
        return lambda pixels, labels: (pixels, np.full_like(labels, seed))

    images = scan_folder(cats_dogs16, screen=False)
    seeds = [[float(part[1][0, 0]) for part in make_dataset(images, 16, 8, epochs=range(1), num_classes=2,
                                                             pipeline="pydataset", mix=seed_as_labels, shard=shard)]
             for shard in (Shard(index=0, count=2, devices=2), Shard(index=1, count=2, devices=2))]
    assert len(seeds[0]) == 2 and all(first != second for first, second in zip(*seeds))


def test_options_or_variables_ask_for_a_multihost_run(monkeypatch):
    from transferkit.training.multihost import requested

    for name in ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert not requested() and requested(num_processes=2)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a batch script's own step: one process
    assert not requested()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun -n 2
    assert requested()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "4")
    assert requested()


@under_jax
def test_joining_after_jax_started_is_one_line():
    from transferkit.errors import TransferkitError
    from transferkit.training.multihost import initialize

    keras.ops.convert_to_numpy(keras.ops.zeros(1))  # JAX has started in this process
    with pytest.raises(TransferkitError, match="must start before any Keras or JAX work"):
        initialize("localhost:1234", 2, 1)


@under_jax
def test_a_cluster_step_that_says_too_little_is_one_line(cats_dogs16, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output": str(tmp_path / "run"),
                                      "data": {**RECIPE["data"], "train": str(cats_dogs16)}}))
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SLURM_", "KERAS_DISTRIBUTION_"))}
    done = subprocess.run([sys.executable, "-m", "transferkit", "finetune", str(recipe)], capture_output=True, text=True,
                          env={**env, "KERAS_BACKEND": "jax", "SLURM_STEP_NUM_TASKS": "2"}, timeout=120)
    assert done.returncode == 2 and "multi-host training cannot start" in done.stderr, done.stderr[-2000:]
    assert "Give --coordinator, --num-processes and --process-id" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--num-processes", "2", "--process-id", "0"], "needs --coordinator too"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "expected 0 to 1"),
])
def test_options_that_cannot_make_a_run_are_one_line(args, message, in_process, cats_dogs16, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output": str(tmp_path / "run"),
                                      "data": {**RECIPE["data"], "train": str(cats_dogs16)}}))
    code, out, err = in_process("finetune", recipe, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(keras.backend.backend() == "jax", reason="the error of the other backends")
def test_other_backends_say_to_use_jax(in_process, cats_dogs16, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output": str(tmp_path / "run"),
                                      "data": {**RECIPE["data"], "train": str(cats_dogs16)}}))
    code, out, err = in_process("finetune", recipe, "--coordinator", "localhost:1234", "--num-processes", "2",
                                "--process-id", "1")
    assert code == 2 and err.strip().endswith(JAX_ONLY) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
