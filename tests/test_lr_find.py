"""The learning-rate finder: fastai's suggestions on known curves, and sweeps of MobileNet alpha 0.25
(96 px, batches of 8) on 40 real cats and dogs, through the Python API and `transferkit lr-find`."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from transferkit.errors import TransferkitError
from transferkit.recipe import load_recipe
from transferkit.training.lr_find import (RISE_MARGIN, check_sweep, rise_index, smooth, steepest_index,
                                          suggest_rates, sweep_schedule, valley_index)

STEPS = 30


def test_smoothing_is_the_bias_corrected_moving_average():
    assert np.allclose(smooth([3.0, 3.0, 3.0]), 3.0)  # bias-corrected: a constant loss stays itself
    smoothed = smooth([2.0, 4.0])
    assert smoothed[0] == 2.0 and smoothed[1] == pytest.approx((0.98 * 0.02 * 2 + 0.02 * 4) / (1 - 0.98 ** 2))


def test_the_sweep_schedule_runs_exponentially_from_start_to_end():
    from transferkit.training.schedules import build_schedule, learning_rate_at

    fields = sweep_schedule(1e-7, 10.0, 50)
    schedule = build_schedule(fields.pop("name"), 1e-7, 50, 1, **fields)
    rates = np.array([learning_rate_at(schedule, step) for step in range(50)])
    np.testing.assert_allclose(rates, np.geomspace(1e-7, 10.0, 50), rtol=1e-4)


def synthetic_curve():
    """A flat start, a fall from 1e-5 to 1e-2 steepest at 1e-3, then a blow-up: what a sweep looks like."""
    rates = np.geomspace(1e-7, 10, 100)
    x = np.log10(rates)
    fall = 1.0 / (1.0 + np.exp(4.0 * (x + 3.0)))  # a sigmoid in log rate, steepest at 1e-3
    curve = 1.0 + fall + np.where(x > -2, 3.0 * (x + 2) ** 2, 0.0)
    curve[x < -5] = curve[x < -5].max()  # flat: not part of the valley
    return rates, curve


def test_valley_is_half_way_down_the_longest_valley_and_steepest_where_the_loss_falls_fastest():
    rates, curve = synthetic_curve()
    valley_start = np.flatnonzero(np.log10(rates) < -5)[-1]
    bottom = int(np.argmin(curve))
    valley = valley_index(curve)
    assert valley_start < valley < bottom
    assert abs(valley - (valley_start + bottom) / 2) <= 2  # fastai: start + a third + a sixth of the valley
    assert rates[steepest_index(rates, curve)] == pytest.approx(1e-3, rel=0.15)

    suggested = suggest_rates(rates, curve, planned_steps=100)
    assert suggested["valley"]["learning_rate"] == pytest.approx(rates[valley])
    assert suggested["valley"]["step"] == valley + 1
    assert suggested["steepest"]["learning_rate"] == pytest.approx(1e-3, rel=0.15)


def test_suggestions_leave_out_the_first_tenth_the_last_steps_and_what_follows_a_nan():
    rates, curve = synthetic_curve()
    curve = curve.copy()
    curve[:10] = 0.0  # below everything: would be the valley's end and a steep rise if it counted
    curve[70:] = np.nan
    suggested = suggest_rates(rates, curve, planned_steps=100)
    for point in suggested.values():
        assert rates[10] <= point["learning_rate"] < rates[70] and np.isfinite(point["loss"])
    with pytest.raises(TransferkitError, match="diverged after 12 of 100 steps"):
        suggest_rates(rates[:12], curve[:12], planned_steps=100)


def flat_then_rising_curve():
    """What a sweep looks like after a linear probe: flat within +-3% noise, then climbing from 1e-3."""
    rates = np.geomspace(1e-7, 10, 100)
    x = np.log10(rates)
    wiggle = 0.03 * (-1.0) ** np.arange(100)  # 1.03 / 0.97: a 6% swing, below the 10% that counts as a rise
    return rates, 1.0 + wiggle + np.where(x > -3, 0.5 * (x + 3) ** 2, 0.0)


def test_rise_is_a_margin_below_the_rate_where_the_loss_first_climbs_ten_percent_above_its_lowest_point():
    rates, curve = flat_then_rising_curve()
    edge = rates[np.flatnonzero(curve > 1.1 * np.minimum.accumulate(curve))[0]]
    assert 1e-3 < edge < 1e-2  # past the noise, once the climb is real
    rise = rise_index(rates, curve)
    assert rates[rise] <= edge / RISE_MARGIN < rates[rise + 1]
    suggested = suggest_rates(rates, curve, planned_steps=100)
    assert suggested["rise"] == {"learning_rate": pytest.approx(rates[rise]), "loss": pytest.approx(curve[rise]),
                                 "step": rise + 1}
    assert suggested["valley"]["learning_rate"] < 1e-4  # the valley of the flat part: noise
    flat = 1.0 + 0.03 * (-1.0) ** np.arange(100)
    assert rise_index(rates, flat) == np.searchsorted(rates, rates[-1] / RISE_MARGIN) - 1  # never rose: the last rate


@pytest.mark.parametrize("recipe_keys, asked, chosen", [
    ({"warmup": {"linear_probe": True}}, "auto", "rise"),
    ({"warmup": {"epochs": 2}}, "auto", "rise"),
    ({"warmup": {"epochs": 0}}, "auto", "valley"),
    ({"warmup": {"linear_probe": True}}, "valley", "valley"),
    ({"warmup": {"epochs": 0}}, "steepest", "steepest"),
])
def test_auto_suggests_rise_after_a_trained_head_and_valley_from_a_new_one(recipe_keys, asked, chosen, tmp_path):
    from transferkit.strategies.lr_find import chosen_suggestion

    recipe = load_recipe({"name": "r", "data": {"train": str(tmp_path)}, "strategy": "finetune", **recipe_keys})
    assert chosen_suggestion(recipe, asked) == chosen


@pytest.mark.parametrize("start, end, steps, message", [
    (1e-3, 1e-5, 100, "start .* must be below end"),
    (0.0, 10.0, 100, "start must be a learning rate > 0"),
    (1e-7, float("inf"), 100, "end must be a learning rate > 0"),
    (1e-7, 10.0, 5, "steps must be a whole number from 10"),
])
def test_bad_sweeps_are_one_line_errors(start, end, steps, message):
    with pytest.raises(TransferkitError, match=message):
        check_sweep(start, end, steps)


# --------------------------------------------------------------------------------------------
# Sweeps on real images
# --------------------------------------------------------------------------------------------

def recipe_dict(data, output, **finetune_keys):
    return {"name": "cd-lr", "seed": 0, "strategy": "finetune",
            "data": {"train": str(data), "val": 0.25, "image_size": 96, "batch_size": 8,
                     "augment": ["random_flip"]},
            "backbone": {"name": "mobilenet", "alpha": 0.25},
            "warmup": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
            "finetune": {"epochs": 2, "unfreeze": "all", "optimizer": {"name": "adam", "learning_rate": 1e-3},
                         "layer_decay": 0.9, "label_smoothing": 0.1, **finetune_keys},
            "output": str(output)}


@pytest.fixture(scope="module")
def found(small_cats_dogs, home, tmp_path_factory):
    from transferkit import lr_find

    folder = tmp_path_factory.mktemp("lr")
    recipe = load_recipe(recipe_dict(small_cats_dogs, folder / "run"))
    return lr_find(recipe, steps=STEPS, write=folder / "with_lr.yaml", progress=False)


@pytest.mark.slow
@pytest.mark.backends
def test_the_sweep_raises_the_rate_exponentially_and_records_finite_losses(found):
    rates = np.array(found.sweep.learning_rates)
    assert rates[0] == pytest.approx(1e-7, rel=1e-4) and np.all(np.diff(rates) > 0)
    np.testing.assert_allclose(rates, np.geomspace(1e-7, 10.0, STEPS)[:len(rates)], rtol=1e-4)  # the optimizer's
    assert len(rates) >= STEPS // 2 and np.all(np.isfinite(found.sweep.raw_losses[:-1]))
    np.testing.assert_allclose(found.sweep.losses, smooth(found.sweep.raw_losses))
    for point in found.suggestions.values():
        assert rates[0] <= point["learning_rate"] <= rates[-1] and np.isfinite(point["loss"])
    assert found.suggest == "rise"  # auto: the recipe warms the head up for an epoch
    assert found.learning_rate == float(f"{found.suggestions['rise']['learning_rate']:.3g}")


@pytest.mark.slow
@pytest.mark.backends
def test_the_sweep_writes_its_curve_and_a_recipe_with_the_suggested_rate(found):
    assert found.folder == Path(found.recipe.output) / "lr_find"
    report = json.loads((found.folder / "lr_find.json").read_text())
    assert report["learning_rate"] == found.learning_rate and report["suggest"] == "rise"
    assert len(report["learning_rates"]) == len(report["losses"]) == report["steps_taken"]
    assert set(report["suggestions"]) == {"valley", "steepest", "rise"}
    assert (found.folder / "lr_find.png").read_bytes().startswith(b"\x89PNG")

    text = found.written.read_text()
    assert text.startswith(f"# transferkit lr-find: finetune.optimizer.learning_rate {found.learning_rate:g} "
                           "is its rise suggestion")
    written = load_recipe(found.written)
    assert written.finetune.optimizer.learning_rate == found.learning_rate
    assert written.warmup.optimizer.learning_rate == 1e-3 and written.finetune.layer_decay == 0.9
    assert written.name == "with_lr" and written.data.train == found.recipe.data.train


@pytest.mark.slow
@pytest.mark.backends
def test_the_sweep_gives_the_model_back_its_weights(small_cats_dogs, home):
    import keras

    from transferkit.data.pipelines import make_dataset
    from transferkit.data.splits import load_splits
    from transferkit.models.backbones import create_backbone
    from transferkit.models.heads import attach_head
    from transferkit.training.lr_find import run_sweep
    from transferkit.training.schedules import build_schedule

    images = load_splits(str(small_cats_dogs), None, None).train
    model = attach_head(create_backbone("mobilenet", image_size=64, alpha=0.25), 2)
    fields = sweep_schedule(1e-4, 1.0, 12)
    model.compile(optimizer=keras.optimizers.SGD(build_schedule(fields.pop("name"), 1e-4, 12, 1, **fields),
                                                 momentum=0.9), loss="categorical_crossentropy")
    before = [np.array(w) for w in model.get_weights()]
    sweep = run_sweep(model, make_dataset(images, 64, 8, num_classes=2, seed=0, epochs=range(3)), 12, progress=False)
    assert len(sweep.losses) >= 2 and sweep.learning_rates[0] == pytest.approx(1e-4, rel=1e-4)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.slow
def test_lr_find_on_the_command_line_stops_where_the_loss_diverges(small_cats_dogs, home, tmp_path, in_process,
                                                                   caplog):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(small_cats_dogs, tmp_path / "run",
                                               optimizer={"name": "sgd", "learning_rate": 0.01})))
    code, out, err = in_process("lr-find", path, "--steps", 10, "--start", "1", "--end", "1e6", "--output",
                                tmp_path / "too_high")
    assert code == 2 and "the loss diverged after" in err and "too few to suggest a rate" in err
    assert len(err.strip().splitlines()[-1:]) == 1 and err.strip().splitlines()[-1].startswith("error: ")
    assert (tmp_path / "too_high" / "lr_find.png").is_file()  # the curve, to see why
    assert json.loads((tmp_path / "too_high" / "lr_find.json").read_text())["learning_rate"] is None

    with caplog.at_level(logging.INFO, logger="transferkit"):
        code, out, err = in_process("lr-find", path, "--steps", STEPS, "--start", "1e-5", "--end", "1e4",
                                    "--write", path, "--force", "--output", tmp_path / "sweep")
    assert code == 0, err
    report = json.loads((tmp_path / "sweep" / "lr_find.json").read_text())
    assert report["steps_taken"] < STEPS and report["stopped"]  # passed 4x its minimum, or became NaN
    assert "lr-find: step 3/30" in caplog.text and "lr-find: stopped after" in caplog.text  # progress
    assert f"suggested learning rate: {report['learning_rate']:g} (rise; valley" in out
    written = load_recipe(path)  # --force: the recipe itself, now with the suggested rate
    assert written.finetune.optimizer.learning_rate == report["learning_rate"]
    assert written.finetune.optimizer.name == "sgd"


def test_bad_lr_find_arguments_exit_2_with_one_line_before_any_work(small_cats_dogs, tmp_path, in_process):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(small_cats_dogs, tmp_path / "run")))
    extract = tmp_path / "extract.yaml"
    extract.write_text(yaml.safe_dump({**recipe_dict(small_cats_dogs, tmp_path / "run"), "strategy": "extract"}))
    for args, message in [
        ((extract,), "lr-find is for fine-tuning: the recipe's strategy is extract"),
        ((path, "--start", "1", "--end", "0.1"), "must be below end"),
        ((path, "--start", "-1"), "start must be a learning rate > 0"),
        ((path, "--steps", "5"), "steps must be a whole number from 10"),
        ((path, "--write", path), "the file exists: add --force"),
        ((path, "--set", "finetune.epochs=0"), "finetune.epochs: is 0"),
    ]:
        code, out, err = in_process("lr-find", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "run").exists()


def test_a_run_replaces_an_output_folder_holding_only_a_sweep_and_keeps_it(tmp_path):
    from transferkit.outputs import OutputFolder

    output = tmp_path / "run"
    (output / "lr_find").mkdir(parents=True)
    (output / "lr_find" / "lr_find.json").write_text("{}")
    with OutputFolder(output) as out:
        (out.partial / "run.json").write_text("{}")
        out.commit()
    assert (output / "run.json").is_file() and (output / "lr_find" / "lr_find.json").read_text() == "{}"
