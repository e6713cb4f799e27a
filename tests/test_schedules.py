"""The one_cycle and plateau schedules: one cycle's closed form, a plateau's drops (judged per epoch,
on a real fit, across a resume) and bad ones at `transferkit validate`."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from keras import ops
from test_lifecycle import interrupt_after_epoch, tiny  # noqa: F401 (tiny: 8 cats and 8 dogs, a fixture)
from test_validate import write

from transferkit.errors import RecipeError
from transferkit.recipe import load_recipe
from transferkit.training.callbacks import ReduceOnPlateau
from transferkit.training.optim import build_optimizer
from transferkit.training.schedules import build_schedule, learning_rate_at
from transferkit.training.trainer import TrainingError

# --------------------------------------------------------------------------------------------
# one_cycle: base 0.1, 10 epochs of 10 steps: the full rate at step 0.3 * 100 - 1 = 29
# --------------------------------------------------------------------------------------------

START, END = 0.1 / 25, 0.1 / 25 / 1e4


def one_cycle(**fields):
    return build_schedule("one_cycle", 0.1, epochs=10, steps_per_epoch=10, **fields)


@pytest.mark.parametrize("fields, step, expected", [
    ({}, 0, START),
    ({}, 29, 0.1),
    ({}, 64, (0.1 + END) / 2),  # halfway down from step 29 to step 99
    ({}, 99, END),
    ({}, 5000, END),  # after the planned steps it stays at the end
    ({"pct_start": 0.21}, 10, (START + 0.1) / 2),  # halfway up to step 20
    ({"div_factor": 10, "final_div_factor": 100}, 0, 0.01),
    ({"div_factor": 10, "final_div_factor": 100}, 99, 1e-4),
    ({"min_learning_rate": 1e-3}, 99, 1e-3),
])
def test_one_cycle_starts_peaks_and_ends_where_its_factors_say(fields, step, expected):
    assert learning_rate_at(one_cycle(**fields), step) == pytest.approx(expected, rel=1e-5)


def test_one_cycle_rises_to_its_peak_then_falls():
    rates = np.array([learning_rate_at(one_cycle(), step) for step in range(100)])
    assert np.all(np.diff(rates[:30]) > 0) and np.all(np.diff(rates[29:]) < 0)


def test_one_cycle_refuses_a_warm_up_of_its_own():
    with pytest.raises(RecipeError, match=r"^warmup_epochs: one_cycle warms up by itself"):
        one_cycle(warmup_epochs=1)


# --------------------------------------------------------------------------------------------
# plateau: the rate and its scale, and ReduceOnPlateau's judgement epoch by epoch
# --------------------------------------------------------------------------------------------

def test_plateau_is_the_constant_rate_times_its_scale_warm_up_included():
    schedule = build_schedule("plateau", 0.1, epochs=10, steps_per_epoch=4, warmup_epochs=1, min_learning_rate=0.02)
    optimizer = build_optimizer("sgd", schedule)
    schedule.attach(optimizer, scale=0.5)
    assert "plateau_scale" in [variable.name for variable in optimizer.variables]
    assert [learning_rate_at(schedule, step) for step in (0, 3, 4, 39)] == pytest.approx([0.0125, 0.05, 0.05, 0.05])
    schedule.scale.assign(0.1)
    assert learning_rate_at(schedule, 39) == pytest.approx(0.02)  # the floor


def test_only_a_plateau_schedule_adds_a_variable_to_its_optimizer():
    schedule = build_schedule("cosine", 0.1, epochs=10, steps_per_epoch=4)
    optimizer = build_optimizer("sgd", schedule)
    before = len(optimizer.variables)
    schedule.attach(optimizer, scale=0.5)
    assert len(optimizer.variables) == before and learning_rate_at(schedule, 0) == pytest.approx(0.1)


def judged(values, monitor="val_loss", **fields):
    """The optimizer's rate after each epoch whose ``monitor`` is ``values``, and the plateau state."""
    schedule = build_schedule("plateau", 0.1, epochs=10, steps_per_epoch=1, monitor=monitor, **fields)
    optimizer, state, record = build_optimizer("sgd", schedule), {}, SimpleNamespace(last={})
    schedule.attach(optimizer)
    callback = ReduceOnPlateau(record, state, schedule)
    rates = []
    for epoch, value in enumerate(values):
        record.last = {"loss": 1.0, monitor: value, "learning_rate": 0.1, "seconds": 0.1}
        callback.on_epoch_end(epoch)
        rates.append(float(ops.convert_to_numpy(optimizer.learning_rate)))
    return rates, state


@pytest.mark.parametrize("values, fields, expected", [
    ([1.0, 1.1, 1.2, 0.9, 1.0, 1.0], {"patience": 2, "gamma": 0.5}, [0.1, 0.1, 0.05, 0.05, 0.05, 0.025]),
    ([1.0] * 6, {"patience": 1, "gamma": 0.5, "cooldown": 2}, [0.1, 0.05, 0.05, 0.05, 0.025, 0.025]),
    ([1.0] * 5, {"patience": 1, "gamma": 0.5, "min_learning_rate": 0.03}, [0.1, 0.05, 0.03, 0.03, 0.03]),
    ([1.0, 0.95, 0.9], {"patience": 2, "min_delta": 0.1}, [0.1, 0.1, 0.01]),  # 0.05 and 0.1 are no improvement
])
def test_plateau_drops_after_patience_epochs_without_improvement(values, fields, expected):
    assert judged(values, **fields)[0] == pytest.approx(expected)


def test_plateau_on_a_metric_that_rises_keeps_the_best_across_a_drop():
    rates, state = judged([0.5, 0.6, 0.55, 0.55, 0.58], monitor="val_accuracy", patience=2, gamma=0.5)
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05])
    assert state == {"scale": 0.5, "best": 0.6, "wait": 1, "cooldown": 0}


def test_plateau_logs_each_drop(caplog):
    with caplog.at_level(logging.INFO, logger="transferkit"):
        judged([1.0, 1.0], patience=1, gamma=0.5)
    assert "plateau: val_loss has not improved for 1 epochs (best 1.0000): learning rate 1.00e-01 -> 5.00e-02" \
        in caplog.text


def test_plateau_on_a_metric_that_is_not_logged_says_which_are():
    schedule = build_schedule("plateau", 0.1, epochs=1, steps_per_epoch=1, monitor="val_top5")
    record = SimpleNamespace(last={"loss": 1.0, "val_loss": 1.0, "learning_rate": 0.1, "seconds": 0.1})
    expected = r"^schedule.monitor: 'val_top5' is not logged; give one of loss, val_loss$"
    with pytest.raises(TrainingError, match=expected):
        ReduceOnPlateau(record, {}, schedule).on_epoch_end(0)


# --------------------------------------------------------------------------------------------
# A real fit: the drops, and their state across a checkpoint and resume
# --------------------------------------------------------------------------------------------

def plateau_recipe(data, output):
    """Fine-tuning only, with layer-wise rates; min_delta 10: no epoch after the first improves."""
    return load_recipe({
        "name": "plateau", "seed": 5, "strategy": "finetune", "output": str(output),
        "data": {"train": str(data), "val": 0.25, "image_size": 32, "batch_size": 8},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "warmup": {"epochs": 0},
        "finetune": {"epochs": 4, "unfreeze": {"top_blocks": 1}, "layer_decay": 0.8,
                     "optimizer": {"name": "adam", "learning_rate": 1e-3},
                     "schedule": {"name": "plateau", "patience": 1, "cooldown": 1, "gamma": 0.5, "min_delta": 10}}})


@pytest.mark.slow
@pytest.mark.backends
def test_plateau_drops_on_a_real_fit_and_a_resumed_run_drops_as_an_uninterrupted_one(
        tiny, home, tmp_path, monkeypatch):
    from transferkit.strategies.finetune import finetune, unfinished_run

    whole = finetune(plateau_recipe(tiny, tmp_path / "whole"), progress=False)
    # epoch 2 drops the rate, epoch 3 is the cooldown, so epoch 4 may not drop it again
    assert whole.history["learning_rate"] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 2)  # right after the first drop, with the cooldown still to come
        with pytest.raises(KeyboardInterrupt):
            finetune(plateau_recipe(tiny, tmp_path / "resumed"), progress=False)
    state = unfinished_run(tmp_path / "resumed")["plateau"]
    assert state == {"scale": 0.5, "best": whole.history["val_loss"][0], "wait": 0, "cooldown": 1}
    resumed = finetune(plateau_recipe(tiny, tmp_path / "resumed"), resume=True, progress=False)
    for key in whole.history:
        if key != "seconds":
            assert resumed.history[key] == whole.history[key], key
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------------------------
# transferkit validate
# --------------------------------------------------------------------------------------------

def recipe_with(tmp_path, schedule: str):
    """A fine-tuning recipe file (and its photos) with ``schedule``."""
    return write(tmp_path, f"strategy: finetune\nfinetune: {{schedule: {schedule}}}\n")


@pytest.mark.parametrize("schedule, fragment", [
    ("{name: plateau, monitor: val_acc}", "finetune.schedule.monitor: 'val_acc' is not logged: did you mean "
                                          "val_accuracy?"),
    ("{name: plateau, patience: 0}", "finetune.schedule.patience"),
    ("{name: one_cycle, pct_start: 1.5}", "finetune.schedule.pct_start"),
    ("{name: one_cycle, warmup_epochs: 1}", "finetune.schedule.warmup_epochs: one_cycle warms up by itself"),
    ("{name: one_cycel}", "finetune.schedule.name"),
])
def test_a_bad_schedule_fails_at_validate_in_one_line(tmp_path, in_process, schedule, fragment):
    code, _, error = in_process("validate", recipe_with(tmp_path, schedule))
    assert code == 2 and len(error.strip().splitlines()) == 1 and fragment in error, error


@pytest.mark.parametrize("schedule", ["{name: one_cycle, pct_start: 0.25}",
                                      "{name: plateau, monitor: val_accuracy, cooldown: 1, warmup_epochs: 1}"])
def test_a_good_schedule_passes_validate(tmp_path, in_process, schedule):
    code, _, error = in_process("validate", recipe_with(tmp_path, schedule))
    assert code == 0, error
