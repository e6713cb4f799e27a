"""transferkit tune: the tune section checked at validate, the default space around the recipe, the
trial loop on small real data (held-out test touched once, trials reused, resume after kill -9), the
budget and the pruner's epoch hook, and `recommend --budget`."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from test_cli import assert_one_line_error, transferkit
from test_validate import write

from transferkit.errors import TransferkitError
from transferkit.recipe import load_recipe
from transferkit.strategies.space import centre, search_space
from transferkit.strategies.trials import (
    BudgetSpent, EpochHook, estimate_seconds, fitted_epochs, full_length, make_trial_recipe, shortened_note,
)
from transferkit.strategies.tune import tune

SMALL = ("seed: 3\nbackbone: {name: mobilenet_v2, alpha: 0.35}\n"
         "warmup: {epochs: 1}\nfinetune: {epochs: 2, unfreeze: {fraction: 0.2}}\n")


# --- the tune section: every bad entry is one line at validate -------------------------------------

@pytest.mark.parametrize("space, fragments", [
    ("{finetune.epochz: [1, 2]}", ["tune.space.finetune.epochz", "did you mean finetune.epochs"]),
    ("{finetune.epochs: []}", ["tune.space.finetune.epochs", "at least one choice"]),
    ("{finetune.epochs: {low: 8, high: 2}}", ["tune.space.finetune.epochs", "empty range", "low 8", "high 2"]),
    ("{finetune.epochs: {low: 3, high: 3}}", ["tune.space.finetune.epochs", "empty range"]),
    ("{finetune.epochs: {low: 1.5, high: 4}}", ["tune.space.finetune.epochs", "whole number"]),
    ("{strategy: [extract, finetun]}", ["tune.space.strategy", "'finetun'", "did you mean finetune"]),
    ("{finetune.optimizer.learning_rate: {low: 0, high: 0.1, log: true}}", ["log range needs low > 0"]),
    ("{finetune.optimizer.learning_rate: {lo: 0.001, high: 0.1}}", ["unknown key 'lo'", "did you mean low"]),
    ("{data.val: [0.1, 0.2]}", ["tune.space.data.val", "validation split stays fixed"]),
    ("{extract.layer: [top, block_99_add]}", ["tune.space.extract.layer", "block_99_add"]),
    ("{extract.classifier.name: [logistic_regression, svmm]}", ["tune.space.extract.classifier.name", "svmm"]),
    ("{finetune.optimizer.name: [sgd, sgdd], strategy: [finetune]}", ["tune.space.finetune.optimizer.name", "sgdd"]),
    ("{finetune.optimizer.name: [sgd, adam], strategy: [finetune]}", ["'adam'", "takes no momentum"]),
    ("{finetune.epochs: [1, 2]}", ["tune.space.finetune.epochs", "no trial would use it", "runs extract"]),
])
def test_a_bad_tune_space_fails_at_validate(tmp_path, space, fragments):
    result = transferkit("validate", write(tmp_path, SMALL + f"tune: {{space: {space}}}\n"))
    assert_one_line_error(result, *fragments)


def test_a_bad_budget_fails_at_validate_and_on_the_command_line(tmp_path):
    assert_one_line_error(transferkit("validate", write(tmp_path, SMALL + "tune: {budget: soon}\n")),
                          "tune.budget", "90s, 25m, 2h")
    assert_one_line_error(transferkit("tune", write(tmp_path, SMALL), "--budget", "0m"), "--budget", "above zero")


def test_a_sound_tune_section_validates(tmp_path, in_process):
    code, out, error = in_process("validate", write(tmp_path, SMALL + (
        "tune: {budget: 1h30m, metric: accuracy, space: {strategy: [extract, finetune], "
        "finetune.optimizer.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}, "
        "extract.layer: [top, block_12_add], finetune.epochs: {low: 1, high: 4}}}\n")))
    assert code == 0, error
    assert yaml.safe_load(out)["tune"]["space"]["extract.layer"] == ["top", "block_12_add"]


# --- the space: centred on the recipe, so the first trial is the recipe as it is --------------------

@pytest.mark.parametrize("strategy", ["extract", "finetune"])
def test_the_first_trial_of_each_strategy_is_the_recipe_itself(tmp_path, strategy):
    recipe = load_recipe(write(tmp_path, SMALL + f"strategy: {strategy}\n"
                               "tune: {space: {strategy: [extract, finetune]}}\n"))
    space = search_space(recipe)
    assert {p.key for p in space.values() if "finetune" in p.strategies} >= {
        "finetune.unfreeze", "finetune.optimizer.learning_rate", "finetune.epochs", "data.image_size"}
    assert {p.key for p in space.values() if "extract" in p.strategies} >= {"extract.layer", "extract.tta"}
    for each in ("extract", "finetune"):
        trial = optuna.trial.FixedTrial(centre(recipe, space, each))
        from transferkit.strategies.space import suggest
        values = suggest(trial, space, recipe.strategy)
        first = make_trial_recipe(recipe, values, tmp_path / "out")
        expected = {**recipe.to_dict(), "strategy": each, "output": str(tmp_path / "out")}
        assert first.to_dict() == expected


# --- the budget and the pruner -------------------------------------------------------------------

class _Trial:
    """What EpochHook asks of an Optuna trial."""

    def __init__(self, prune: bool = False):
        self.prune, self.reported = prune, []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.prune


def test_the_epoch_hook_reports_the_validation_error_and_prunes():
    trial = _Trial(prune=True)
    with pytest.raises(optuna.TrialPruned, match="after epoch 2"):
        EpochHook(trial, deadline=time.monotonic() + 3600, epochs=5, maximize=False)(1, {"val_accuracy": 0.75})
    assert trial.reported == [(1, 0.25)]  # 1 - top-1: label smoothing changes the loss, not the error


def test_the_epoch_hook_stops_a_trial_the_budget_cannot_finish_but_not_its_last_epoch():
    hook = EpochHook(_Trial(), deadline=time.monotonic() - 1, epochs=3, maximize=True)
    with pytest.raises(BudgetSpent, match="after epoch 1 of 3"):
        hook(0, {"val_accuracy": 0.5})
    EpochHook(_Trial(), deadline=time.monotonic() - 1, epochs=3, maximize=True)(2, {"val_accuracy": 0.5})


def test_the_epoch_hook_judges_the_epochs_left_by_the_pace_of_the_current_phase(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    hook = EpochHook(_Trial(), deadline=100.0, epochs=6, maximize=True)
    for epoch, seconds in enumerate([5.0, 5.0]):  # two fast warm-up epochs: 4 more at 5 s would fit
        hook.begin(epoch)
        clock[0] += seconds
        hook(epoch, {"val_accuracy": 0.5})
    hook.new_phase()
    hook.begin(2)
    clock[0] += 30.0  # the first fine-tuning epoch: 3 more at 30 s end at 130 s, after the deadline
    with pytest.raises(BudgetSpent, match="after epoch 3 of 6: the other 3 would take about 90s"):
        hook(2, {"val_accuracy": 0.5})


def test_estimates_scale_with_epochs_and_pixels(tmp_path):
    recipe = load_recipe(write(tmp_path, SMALL + "strategy: finetune\ndata: {train: photos, image_size: 64}\n"))
    assert estimate_seconds(recipe, []) is None
    earlier = [{"strategy": "finetune", "seconds": 40.0, "epoch_seconds": [8.0, 10.0, 9.0], "image_size": 32},
               {"strategy": "extract", "seconds": 5.0, "epoch_seconds": [], "image_size": 64},
               {"strategy": "finetune", "seconds": 0.0, "epoch_seconds": [], "image_size": 64, "reused": True}]
    # the slowest epoch, 10 s at 32 px, is 40 s at 64 px; 1 warm-up + 2 fine-tuning epochs; 13 s outside epochs
    assert estimate_seconds(recipe, earlier) == pytest.approx(13.0 + 40.0 * 3)
    assert fitted_epochs(recipe, earlier, seconds_left=13.0 + 40.0 * 6 + 1) == 5  # 5 fine-tuning + the warm-up
    extract = load_recipe(write(tmp_path, SMALL + "data: {train: photos, image_size: 64}\n"))
    assert estimate_seconds(extract, earlier) == pytest.approx(5.0)


def test_a_winner_shortened_to_fit_the_budget_is_written_at_its_planned_epochs(tmp_path):
    recipe = load_recipe(write(tmp_path, SMALL + "strategy: finetune\ndata: {train: photos}\n"))
    attrs = {"fitted": "finetune.epochs 8 -> 2 to fit the budget", "planned_epochs": 8}
    written = full_length(recipe, attrs, output=str(tmp_path / "next"))
    assert (written.finetune.epochs, written.output) == (8, str(tmp_path / "next"))
    assert full_length(recipe, {"epochs": 2}).finetune.epochs == 2  # a trial run as planned stays as it is
    assert "8 -> 2" in shortened_note(attrs)[0] and "runs all 8" in shortened_note(attrs)[1]
    assert shortened_note({}) == []


# --- real searches on small data -----------------------------------------------------------------

def _extract_recipe(small_cats_dogs, tmp_path, **tune):
    return load_recipe({"seed": 5, "data": {"train": str(small_cats_dogs), "val": 0.25, "test": 0.25,
                                            "image_size": 64, "batch_size": 16},
                        "backbone": {"name": "mobilenet_v2", "alpha": 0.35}, "strategy": "extract",
                        "tune": tune, "output": str(tmp_path / "run")})


def test_tune_md_gives_balanced_accuracy_beside_top1():
    from transferkit.reports.tune import to_markdown

    val = {"top1": 0.75, "balanced_accuracy": 0.5, "loss": 0.4, "n": 20}
    row = {"trial": 0, "state": "complete", "strategy": "extract", "params": {}, "plan": None, "val_top1": 0.75,
           "val_balanced_accuracy": 0.5, "val_loss": 0.4, "seconds": 3, "epochs": None, "note": "", "reused": False,
           "fitted": None, "asked": 1}
    text = to_markdown({"name": "xray", "metric": "log_loss", "seconds_spent": 10, "budget_seconds": 60,
                        "trials": [row], "best": {"trial": 0, "plan": None, "params": {}, "val": val},
                        "test": {"top1": 0.7, "balanced_accuracy": 0.6, "loss": 0.5, "n": 30}}, recipe_text=False)
    assert "val top-1 0.750, balanced accuracy 0.500, loss 0.400 (n=20)" in text
    assert "top-1 0.700, balanced accuracy 0.600, loss 0.500 (n=30)" in text
    assert "| val top-1 | val balanced acc. | val loss |" in text and "| 0.750 | 0.500 | 0.400 |" in text


@pytest.mark.slow
def test_a_search_holds_the_test_split_out_of_every_trial_but_the_winner(small_cats_dogs, home, tmp_path):
    recipe = _extract_recipe(small_cats_dogs, tmp_path, budget="10m", trials=4)
    result = tune(recipe)
    folder = tmp_path / "run" / "tune"
    summary = json.loads((folder / "tune.json").read_text())
    assert result.summary["best"] == summary["best"] and summary["test"]["n"] == 10
    assert sum(row["asked"] for row in summary["trials"]) == 4 and summary["trials"][0]["state"] == "complete"
    first = next(row for row in summary["trials"] if row["trial"] == 0)
    assert first["plan"] == "the recipe's (extract)" and first["params"]["extract.layer"] == "top"
    assert first["params"]["extract.tta"] is True and first["params"]["extract.power_norm"] is True
    trial_folders = [path for path in (folder / "trials").iterdir() if (path / "run.json").is_file()]
    with_test = [path for path in trial_folders if (path / "test_metrics.json").exists()]
    assert with_test == [folder / "trials" / summary["best"]["folder"].split("/")[-1]]
    for path in trial_folders:
        assert "test" not in json.loads((path / "run.json").read_text())["metrics"]
        assert (path / "val_metrics.json").is_file()
    best = load_recipe(folder / "best.yaml")
    assert best.output == recipe.output and best.extract.layer == summary["best"]["params"]["extract.layer"]
    assert (folder / "history.png").stat().st_size > 0 and "Winner: trial" in (folder / "tune.md").read_text()
    assert (folder / "study.db").is_file()

    from transferkit.strategies.extract import extract
    run = extract(best)  # the winning recipe runs into the recipe's output, which holds the search: kept
    assert run.folder == tmp_path / "run" and (folder / "study.db").is_file() and (folder / "tune.json").is_file()

    with pytest.raises(TransferkitError, match="--resume to go on"):
        tune(recipe)
    tested = (with_test[0] / "test_metrics.json").stat().st_mtime
    again = tune(recipe, resume=True, trials=6)  # two more; the four finished ones stay as they were
    rows = {row["trial"]: row for row in again.summary["trials"]}
    assert all(rows[row["trial"]]["val_loss"] == row["val_loss"] for row in summary["trials"])
    assert sum(row["asked"] for row in again.summary["trials"]) == 6
    if again.summary["best"]["trial"] == summary["best"]["trial"]:  # the winner's test split: evaluated once
        assert (with_test[0] / "test_metrics.json").stat().st_mtime == tested

    restarted = tune(recipe, restart=True, trials=2)  # a new study: the same plans come back, read from their folders
    assert all(row["reused"] for row in restarted.summary["trials"] if row["state"] == "complete")


@pytest.mark.slow
def test_a_killed_search_resumes_without_redoing_finished_trials(small_cats_dogs, home, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 5, "data": {"train": str(small_cats_dogs), "val": 0.25, "image_size": 64, "batch_size": 8},
        "backbone": {"name": "mobilenet_v2", "alpha": 0.35}, "strategy": "finetune",
        "warmup": {"epochs": 1}, "finetune": {"epochs": 3, "unfreeze": {"fraction": 0.2}},
        "tune": {"budget": "10m", "trials": 3, "pruner": "none"}, "output": str(tmp_path / "run")}))
    folder = tmp_path / "run" / "tune"
    process = subprocess.Popen([sys.executable, "-m", "transferkit", "tune", str(path)], env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not _second_trial_checkpointed(folder):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _second_trial_checkpointed(folder), process.stderr.read()
    with sqlite3.connect(folder / "study.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finished_before = {path.name: (path / "run.json").stat().st_mtime for path in (folder / "trials").iterdir()
                       if (path / "run.json").is_file()}
    assert len(finished_before) == 1

    result = tune(path, resume=True)
    rows = result.summary["trials"]
    assert sum(row["state"] == "complete" for row in rows) == 3
    resumed = [t for t in optuna.load_study(study_name=None, storage=f"sqlite:///{folder / 'study.db'}").trials
               if "resumes" in t.user_attrs]
    assert len(resumed) == 1 and resumed[0].state.name == "COMPLETE"
    for name, mtime in finished_before.items():  # not trained again
        assert (folder / "trials" / name / "run.json").stat().st_mtime == mtime


def _second_trial_checkpointed(folder) -> bool:
    """One trial has finished and the next has finished an epoch (its checkpoint state is written)."""
    trials = list((folder / "trials").glob("*")) if (folder / "trials").is_dir() else []
    return any((path / "run.json").is_file() for path in trials) and any(
        path.name.endswith(".partial") and (path / "checkpoint" / "state.json").is_file() for path in trials)


@pytest.mark.slow
def test_recommend_with_a_budget_writes_the_winner_with_its_evidence(datasets, home, tmp_path):
    written = tmp_path / "picked.yaml"
    result = transferkit("recommend", "--data", datasets / "cats_dogs", "--budget", "75s", "--set", "data.image_size=64",
                         "--set", "backbone.alpha=0.35", "--set", "data.test=0.25", "--write", written,
                         cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    assert "the table's" in result.stdout and "Winner: trial" in result.stdout
    text = written.read_text()
    assert "# the table said: extract" in text and "# test split, evaluated once on the winner" in text
    recipe = load_recipe(written)
    assert recipe.data.test == 0.25 and recipe.data.image_size == 64 and recipe.strategy in ("extract", "finetune")
    summary = json.loads((tmp_path / "runs" / "picked" / "tune" / "tune.json").read_text())
    plans = {row["trial"]: row for row in summary["trials"]}
    assert plans[0]["plan"] == "the table's (extract)" and plans[1]["plan"] == "the table's (finetune)"
    assert summary["test"]["n"] == 125 and summary["seconds_spent"] <= 75
