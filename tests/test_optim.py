"""transferkit.training.optim (optimizers by name, layer-wise learning rates) and
transferkit.training.schedules (learning-rate schedules)."""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from transferkit.errors import RecipeError
from transferkit.training.optim import build_optimizer, check_optimizer, layer_decay_multipliers
from transferkit.training.schedules import EpochSchedule, build_schedule, check_schedule, learning_rate_at

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")


def _tiny_model() -> keras.Model:
    """Dense(d1) -> Dense(d2) -> Dense(d3), with the same initial weights every time."""
    inputs = keras.Input((4,))
    x = inputs
    for seed, (name, units) in enumerate((("d1", 3), ("d2", 3), ("d3", 2))):
        x = keras.layers.Dense(units, name=name, kernel_initializer=keras.initializers.GlorotUniform(seed),
                               bias_initializer=keras.initializers.RandomNormal(seed=seed))(x)
    return keras.Model(inputs, x)


def _one_step_updates(name: str, factors: dict | None = None, eager=True, **spec) -> dict[str, np.ndarray]:
    """``variable.path -> change`` after one ``train_on_batch``.

    Args:
        name: the optimizer; ``spec``: more build_optimizer arguments.
        factors: layer name -> learning-rate factor of its kernel.
        eager: run eagerly (fast); False: the compiled train step that ``fit`` uses by default.
    """
    model = _tiny_model()
    before = {v.path: ops.convert_to_numpy(v) for v in model.trainable_variables}
    multipliers = {model.get_layer(layer).kernel.path: f for layer, f in (factors or {}).items()}
    model.compile(build_optimizer(name, 0.1, **spec, layer_multipliers=multipliers), loss="mse", run_eagerly=eager)
    model.train_on_batch(X, Y)
    return {v.path: ops.convert_to_numpy(v) - before[v.path] for v in model.trainable_variables}


# --------------------------------------------------------------------------------------------
# build_optimizer
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("sgd", keras.optimizers.SGD), ("SGD", keras.optimizers.SGD), ("adam", keras.optimizers.Adam),
    ("AdamW", keras.optimizers.AdamW), ("adam_w", keras.optimizers.AdamW),
    ("rmsprop", keras.optimizers.RMSprop), ("RMSprop", keras.optimizers.RMSprop),
    ("nadam", keras.optimizers.Nadam), ("lion", keras.optimizers.Lion),
])
def test_optimizer_names_match_ignoring_case_and_underscores(name, expected):
    optimizer = build_optimizer(name, learning_rate=0.02)
    assert isinstance(optimizer, expected)
    assert float(ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(0.02)


def test_arguments_reach_the_constructor():
    optimizer = build_optimizer("sgd", 0.5, momentum=0.9, nesterov=True, weight_decay=1e-4, options={"clipnorm": 2.0})
    given = (optimizer.momentum, optimizer.nesterov, optimizer.weight_decay, optimizer.clipnorm)
    assert given == (0.9, True, 1e-4, 2.0)
    assert float(ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(0.5)


def test_a_schedule_is_a_learning_rate():
    schedule = build_schedule("step", 0.2, epochs=4, steps_per_epoch=1, step_epochs=1, gamma=0.5)
    optimizer = build_optimizer("adam", schedule)
    optimizer.iterations.assign(2)
    assert float(ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(0.05)


@pytest.mark.parametrize("fields, expected", [
    (dict(name="adamm"), ["optimizer.name: unknown optimizer 'adamm': did you mean adam?",
                          "any keras.optimizers class:", "sgd", "rmsprop"]),
    (dict(name="adam", momentum=0.9), ["optimizer.momentum: adam takes no momentum",
                                       "remove optimizer.momentum", "sgd"]),
    (dict(name="rmsprop", nesterov=True), ["optimizer.nesterov: rmsprop takes no nesterov", "sgd"]),
    (dict(name="adam", options={"beta1": 0.8}), ["optimizer.options.beta1: unknown argument for adam",
                                                 "did you mean beta_1?", "epsilon", "amsgrad"]),
    (dict(name="sgd", options={"momentum": 0.9}), ["optimizer.options.momentum:", "set optimizer.momentum"]),
    (dict(name="sgd", options={"clipnorm": 1.0, "clipvalue": 1.0}), ["optimizer: sgd: Only one of"]),
])
def test_bad_optimizer_arguments_raise_one_line_recipe_errors(fields, expected):
    with pytest.raises(RecipeError) as error, RecipeError.under("optimizer"):
        build_optimizer(learning_rate=1e-3, **fields)
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_check_optimizer_errors_take_the_section_of_the_caller():
    check_optimizer("adamw", 1e-3, weight_decay=1e-4)
    with pytest.raises(RecipeError, match=r"^warmup\.optimizer\.name: unknown optimizer 'adabelief'"):
        with RecipeError.under("warmup.optimizer"):
            check_optimizer("adabelief", 1e-3)
    with pytest.raises(RecipeError, match=r"^finetune\.optimizer: sgd: Only one of"):
        with RecipeError.under("finetune.optimizer"):
            check_optimizer("sgd", 1e-3, options={"clipnorm": 1.0, "clipvalue": 1.0})


def test_bad_layer_multiplier_is_rejected():
    with pytest.raises(ValueError, match="layer_multipliers\\['d1/kernel'\\]"):
        build_optimizer("sgd", 0.01, layer_multipliers={"d1/kernel": -1.0})


# --------------------------------------------------------------------------------------------
# Layer-wise learning rates (the "factor" tests also run on jax and torch, see the last test)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, spec", [("sgd", {}), ("adamw", {"weight_decay": 0.5})])
def test_factor_zero_leaves_a_variable_unchanged_in_a_compiled_step(name, spec):
    updates = _one_step_updates(name, {"d1": 0.0}, eager=False, **spec)
    assert not np.any(updates["d1/kernel"])
    for path in ("d1/bias", "d2/kernel", "d3/kernel"):
        assert np.any(updates[path]), path


@pytest.mark.parametrize("name, spec", [("sgd", {}), ("adam", {}), ("adamw", {"weight_decay": 0.5})])
def test_factor_scales_the_update_of_its_variable_only(name, spec):
    plain, halved = _one_step_updates(name, **spec), _one_step_updates(name, {"d1": 0.5}, **spec)
    assert np.abs(plain["d1/kernel"]).min() > 1e-4  # a real update to compare with
    np.testing.assert_allclose(halved["d1/kernel"], 0.5 * plain["d1/kernel"], rtol=1e-5, atol=1e-7)
    for path in ("d1/bias", "d2/kernel", "d3/kernel"):
        np.testing.assert_allclose(halved[path], plain[path], rtol=1e-5, atol=1e-7)


def test_factor_optimizer_is_an_instance_of_the_named_class():
    optimizer = build_optimizer("sgd", 0.01, momentum=0.9, layer_multipliers={"d1/kernel": 0.25})
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum == 0.9
    assert type(build_optimizer("sgd", 0.01, layer_multipliers={})) is type(keras.optimizers.SGD())


def test_layerwise_optimizer_serialises():
    optimizer = build_optimizer("sgd", 0.01, momentum=0.9, layer_multipliers={"d1/kernel": 0.25})
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is type(optimizer)
    assert restored.get_config()["layer_multipliers"] == {"d1/kernel": 0.25}
    assert restored.momentum == 0.9


@pytest.mark.parametrize("name, spec", [("adamw", {"weight_decay": 0.5}), ("nadam", {}), ("sgd", {"momentum": 0.9})])
def test_factor_optimizer_resumes_exactly_from_its_variables(name, spec):
    """As the trainer resumes: a new optimizer, built, gets the saved ``optimizer.variables``."""
    def compiled(weights=None):
        model = _tiny_model()
        if weights:
            model.set_weights(weights)
        schedule = build_schedule("cosine", 0.1, epochs=4, steps_per_epoch=2, warmup_epochs=1)
        optimizer = build_optimizer(name, schedule, **spec, layer_multipliers={"d1/kernel": 0.0, "d2/kernel": 0.5})
        model.compile(optimizer, loss="mse")
        return model, optimizer

    whole, _ = compiled()
    whole.fit(X, Y, batch_size=4, epochs=4, verbose=0, shuffle=False)
    first, optimizer = compiled()
    first.fit(X, Y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    state = [ops.convert_to_numpy(v) for v in optimizer.variables]
    resumed, optimizer = compiled(first.get_weights())
    optimizer.build(resumed.trainable_variables)
    assert len(optimizer.variables) == len(state)
    for variable, value in zip(optimizer.variables, state):
        variable.assign(value)
    resumed.fit(X, Y, batch_size=4, epochs=4, initial_epoch=2, verbose=0, shuffle=False)
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_factor_optimizer_saves_and_loads_with_its_model(tmp_path):
    model = _tiny_model()
    model.compile(build_optimizer("adamw", 0.1, weight_decay=0.5, layer_multipliers={"d1/kernel": 0.5}), loss="mse")
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) > 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_layer_decay_gives_each_earlier_layer_the_next_power():
    model = _tiny_model()
    assert layer_decay_multipliers(model, 0.5) == {
        "d3/kernel": 1.0, "d3/bias": 1.0, "d2/kernel": 0.5, "d2/bias": 0.5, "d1/kernel": 0.25, "d1/bias": 0.25}


def test_layer_decay_flattens_nested_models_and_can_count_frozen_layers():
    block = keras.Sequential([keras.layers.Dense(3, name="b1"), keras.layers.BatchNormalization(name="bn")],
                             name="block")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), block,
                              keras.layers.Dense(2, name="top")])
    a, b1, bn, top = model.layers[0], block.layers[0], block.layers[1], model.layers[2]

    def factors(*layer_factors, weights="trainable_weights"):
        return {v.path: f for layer, f in layer_factors for v in getattr(layer, weights)}

    assert layer_decay_multipliers(model, 0.5) == factors((top, 1.0), (bn, 0.5), (b1, 0.25), (a, 0.125))
    b1.trainable = False
    assert layer_decay_multipliers(model, 0.5) == factors((top, 1.0), (bn, 0.5), (a, 0.25))
    assert layer_decay_multipliers(model, 0.5, trainable_only=False) == factors(
        (top, 1.0), (bn, 0.5), (b1, 0.25), (a, 0.125), weights="weights")
    assert len(bn.weights) == 4  # moving mean and variance are mapped too


def test_layer_decay_rejects_a_decay_outside_0_1():
    with pytest.raises(RecipeError, match=r"finetune.layer_decay: expected a number in \(0, 1\], got 1.5"):
        with RecipeError.under("finetune"):
            layer_decay_multipliers(_tiny_model(), 1.5)


# --------------------------------------------------------------------------------------------
# Schedules: base rate 0.1, 10 epochs of 4 steps unless said otherwise
# --------------------------------------------------------------------------------------------

def _cos(progress, top=0.1, bottom=0.0):
    return bottom + (top - bottom) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("spec, step, expected", [
    (dict(kind="constant"), 39, 0.1),
    (dict(kind="step", step_epochs=3, gamma=0.1), 11, 0.1),
    (dict(kind="step", step_epochs=3, gamma=0.1), 12, 0.01),
    (dict(kind="step", step_epochs=3, gamma=0.1), 24, 0.001),
    (dict(kind="exponential", gamma=0.5), 2, 0.1 * 0.5 ** 0.5),
    (dict(kind="exponential", gamma=0.5), 8, 0.025),
    (dict(kind="cosine"), 0, 0.1),
    (dict(kind="cosine"), 10, _cos(0.25)),
    (dict(kind="cosine", min_learning_rate=0.01), 20, 0.055),
    (dict(kind="cosine", min_learning_rate=0.01), 40, 0.01),
    (dict(kind="cosine", min_learning_rate=0.01), 400, 0.01),
    # warm-up over 2 epochs = 8 steps: base * (step + 1) / 8, then cosine over the other 8 epochs
    (dict(kind="cosine", warmup_epochs=2), 0, 0.0125),
    (dict(kind="cosine", warmup_epochs=2), 3, 0.05),
    (dict(kind="cosine", warmup_epochs=2), 7, 0.1),
    (dict(kind="cosine", warmup_epochs=2), 8, 0.1),
    (dict(kind="cosine", warmup_epochs=2), 24, 0.05),
    (dict(kind="constant", warmup_epochs=1, min_learning_rate=0.05), 0, 0.025),  # warm-up may go below
    # floor: 0.1 * 0.1 ** 2 = 0.001 < 0.005
    (dict(kind="exponential", gamma=0.1, min_learning_rate=0.005), 4, 0.01),
    (dict(kind="exponential", gamma=0.1, min_learning_rate=0.005), 8, 0.005),
    (dict(kind="step", step_epochs=1, gamma=0.1, min_learning_rate=0.005), 39, 0.005),
])
def test_schedule_values_match_the_closed_form(spec, step, expected):
    schedule = build_schedule(**spec, learning_rate=0.1, epochs=10, steps_per_epoch=4)
    assert learning_rate_at(schedule, step) == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_sgdr_restarts_at_the_start_of_each_longer_cycle():
    # cycles of 2, 4, 8 epochs after a 1-epoch warm-up: restarts at epochs 1, 3, 7, 15 = steps 4, 12, 28
    schedule = build_schedule("sgdr", 0.1, epochs=20, steps_per_epoch=4, warmup_epochs=1, restart_epochs=2,
                              restart_mult=2.0, min_learning_rate=0.01)
    rates = [learning_rate_at(schedule, step) for step in range(80)]
    restarts = [step for step in range(5, 80) if rates[step] > rates[step - 1]]
    assert restarts == [12, 28, 60]
    for start, length in ((4, 8), (12, 16), (28, 32)):
        assert rates[start] == pytest.approx(0.1)
        assert rates[start + length // 2] == pytest.approx(_cos(0.5, bottom=0.01))
        assert rates[start + length - 1] == pytest.approx(_cos((length - 1) / length, bottom=0.01))
    assert min(rates[4:]) >= 0.01


def test_sgdr_is_computed_per_step_however_many_epochs():
    """No list of cycles: 10000 epochs of equal 1-epoch cycles build and run at once."""
    spec = dict(kind="sgdr", restart_epochs=1, restart_mult=1.0, min_learning_rate=0.01)
    started = time.monotonic()
    schedule = build_schedule(**spec, learning_rate=0.1, epochs=10_000, steps_per_epoch=4)
    rates = [learning_rate_at(schedule, step) for step in (0, 2, 39_996, 39_998, 40_000, 10**9)]
    assert time.monotonic() - started < 5
    assert rates == pytest.approx([0.1, _cos(0.5, bottom=0.01), 0.1, _cos(0.5, bottom=0.01), 0.01, 0.01])


def test_a_schedule_longer_than_the_epoch_bound_is_refused():
    with pytest.raises(ValueError, match="epochs and warmup_epochs must be in 0..10000"):
        EpochSchedule("cosine", 0.1, epochs=10**9, steps_per_epoch=1)
    with pytest.raises(RecipeError, match="finetune.epochs: expected a whole number >= 0 and <= 10000"):
        with RecipeError.under("finetune"):
            build_schedule("function", 0.1, epochs=10**9, steps_per_epoch=1, function="math:hypot")


@pytest.fixture
def lr_module(tmp_path, monkeypatch):
    """An importable module of Keras-style ``fn(epoch, lr)`` functions; its import name."""
    name = "transferkit_test_lr_functions"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def halve_on_even_epochs(epoch, lr):
            return lr / 2 if epoch and epoch % 2 == 0 else lr

        def words(epoch, lr):
            return "fast"

        def one_argument(epoch):
            return 0.1
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_check_schedule_runs_the_function_over_every_epoch_before_training(lr_module):
    check_schedule("function", 0.1, epochs=50, function=f"{lr_module}:halve_on_even_epochs")
    with pytest.raises(RecipeError, match="takes \\(epoch\\), not 2 positional arguments: expected a function"):
        check_schedule("function", 0.1, epochs=5, function=f"{lr_module}:one_argument")
    with pytest.raises(RecipeError, match="returned 'fast' for epoch 0"):
        check_schedule("function", 0.1, epochs=5, function=f"{lr_module}:words")


def test_function_schedule_threads_lr_through_the_epochs(lr_module):
    spec = dict(kind="function", function=f"{lr_module}:halve_on_even_epochs")
    schedule = build_schedule(**spec, learning_rate=0.1, epochs=5, steps_per_epoch=3)
    assert schedule.table == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    for step, expected in ((0, 0.1), (5, 0.1), (6, 0.05), (11, 0.05), (12, 0.025), (1000, 0.025)):
        assert learning_rate_at(schedule, step) == pytest.approx(expected), step


@pytest.mark.parametrize("path, expected", [
    ("no_such_module_xyz:fn", "finetune.schedule.function: cannot import 'no_such_module_xyz:fn' "
                              "(ModuleNotFoundError: No module"),
    ("{module}:missing", "finetune.schedule.function: cannot import '{module}:missing' ("),
    ("{module}.words", "finetune.schedule.function: {module}.words returned 'fast' for epoch 0"),
    (None, "finetune.schedule.function: expected an import path pkg.mod:fn"),
    ("{module}:words", "finetune.schedule.function: {module}:words returned 'fast' for epoch 0"),
])
def test_function_schedule_errors_name_the_key(lr_module, path, expected):
    path = path.format(module=lr_module) if path else path
    with pytest.raises(RecipeError) as error, RecipeError.under("finetune.schedule"):
        build_schedule("function", 0.1, epochs=3, steps_per_epoch=2, function=path)
    assert str(error.value).startswith(expected.format(module=lr_module))


@pytest.mark.parametrize("spec", [
    dict(kind="cosine", warmup_epochs=1, min_learning_rate=0.001),
    dict(kind="sgdr", restart_epochs=1, restart_mult=1.5),
    dict(kind="step", step_epochs=2, gamma=0.3),
])
def test_schedule_config_round_trip(spec):
    schedule = build_schedule(**spec, learning_rate=0.1, epochs=8, steps_per_epoch=5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, EpochSchedule) and restored.get_config() == schedule.get_config()
    for step in (0, 3, 7, 12, 26, 39, 80):
        assert learning_rate_at(restored, step) == pytest.approx(learning_rate_at(schedule, step))


def test_function_schedule_round_trip_needs_no_import(lr_module):
    schedule = build_schedule("function", 0.1, epochs=5, steps_per_epoch=1,
                              function=f"{lr_module}:halve_on_even_epochs")
    config = keras.saving.serialize_keras_object(schedule)
    sys.modules.pop(lr_module)
    restored = keras.saving.deserialize_keras_object(config)
    assert [learning_rate_at(restored, s) for s in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_schedule_follows_the_iterations_counter_across_a_resume():
    spec = dict(kind="cosine", warmup_epochs=1)
    schedule = build_schedule(**spec, learning_rate=0.1, epochs=4, steps_per_epoch=2)
    model = _tiny_model()
    model.compile(build_optimizer("sgd", schedule), loss="mse")
    model.fit(X, Y, batch_size=4, epochs=2, verbose=0)  # 4 steps
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 4
    assert float(ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(_cos(2 / 6))
    resumed = build_optimizer("sgd", build_schedule(**spec, learning_rate=0.1, epochs=4, steps_per_epoch=2))
    resumed.iterations.assign(4)
    assert float(ops.convert_to_numpy(resumed.learning_rate)) == pytest.approx(_cos(2 / 6))


@pytest.mark.parametrize("factor", [None, 0.5])
def test_a_plateau_scale_set_between_epochs_reaches_the_compiled_step_with_or_without_a_factor(factor):
    """As ReduceOnPlateau does, halve the scale after each epoch: each epoch's one step follows it."""
    model = _tiny_model()
    bias = model.get_layer("d3").bias
    schedule = build_schedule("plateau", 0.1, epochs=3, steps_per_epoch=1)
    optimizer = build_optimizer("sgd", schedule, layer_multipliers={bias.path: factor} if factor else None)
    schedule.attach(optimizer, scale=0.5)
    model.compile(optimizer, loss=lambda _, predicted: ops.sum(predicted, axis=-1))  # each bias' gradient: 1
    steps = []

    class HalveTheScale(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.before = ops.convert_to_numpy(bias).copy()

        def on_epoch_end(self, epoch, logs=None):
            steps.append(float(np.mean(self.before - ops.convert_to_numpy(bias))))
            schedule.scale.assign(ops.convert_to_numpy(schedule.scale) * 0.5)

    model.fit(X, Y, batch_size=8, epochs=3, verbose=0, callbacks=[HalveTheScale()])
    assert steps == pytest.approx([rate * (factor or 1.0) for rate in (0.05, 0.025, 0.0125)])


# --------------------------------------------------------------------------------------------
# Other backends: rerun this module's "factor" (layer-wise learning rate) tests under jax and torch
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_on_other_backend(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed: pip install {backend} to test the {backend} backend")
    if keras.backend.backend() == backend:
        pytest.skip(f"this run is already on {backend}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "factor"],
        cwd=REPO, env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
