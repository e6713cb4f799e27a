"""distribute: data_parallel on two virtual CPU devices gives the single-device result (JAX and TensorFlow)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backend, data, output, mode = sys.argv[1:]
    if backend == "tensorflow":  # two logical CPUs, before TensorFlow starts
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import transferkit.strategies.finetune as engine
    from transferkit.recipe import load_recipe

    # Each epoch's order is drawn from the seed and the epoch alone: the same in both modes.
    recipe = load_recipe({"seed": 0, "strategy": "finetune", "output": output, "distribute": mode,
                          "data": {"train": data, "val": 0.25, "image_size": 64, "batch_size": 8},
                          "backbone": {"name": "mobilenet", "alpha": 0.25}, "head": {"dropout": 0.0},
                          "warmup": {"epochs": 0},
                          "finetune": {"epochs": 2, "unfreeze": {"from": "conv_dw_13"},
                                       "optimizer": {"name": "adam", "learning_rate": 0.001},
                                       "schedule": {"name": "constant"}}})
    run = engine.finetune(recipe, progress=False)
    kernel = run.model.get_layer("head_logits").get_weights()[0]
    print(json.dumps({"loss": run.history["loss"], "val_loss": run.history["val_loss"],
                      "kernel": kernel.ravel()[:20].tolist()}))
""")


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_data_parallel_matches_one_device(backend, small_cats_dogs, home, tmp_path):
    pytest.importorskip(backend)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "KERAS_BACKEND": backend, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    results = {}
    for mode in ("none", "data_parallel"):
        done = subprocess.run([sys.executable, str(script), backend, str(small_cats_dogs), str(tmp_path / mode), mode],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        if mode == "data_parallel":
            assert "data parallel over 2 devices" in done.stderr
    single, parallel = results["none"], results["data_parallel"]
    assert parallel["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert parallel["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert parallel["kernel"] == pytest.approx(single["kernel"], rel=1e-3, abs=1e-5)
