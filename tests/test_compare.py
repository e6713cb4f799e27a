"""transferkit compare: paired statistics, and a small real comparison of normal vs imag fine-tuning."""

import dataclasses
import json

import numpy as np
import pytest
import yaml

from transferkit.reports.compare import paired_difference, run_measures, summarize, to_markdown
from transferkit.strategies.compare import compare
from transferkit.errors import RecipeError
from transferkit.recipe import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.backends]


def test_paired_difference_worked_example():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.464 with 2 degrees of freedom
    d = paired_difference([0.5, 0.5, 0.5], [0.6, 0.7, 0.8])
    assert d["mean"] == pytest.approx(0.2) and d["n"] == 3
    half = 4.302653 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert d["ci"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-6)
    assert d["p"] == pytest.approx(0.07418, abs=1e-4)


def test_paired_difference_without_spread():
    assert paired_difference([1, 2], [1, 2]) == {"mean": 0.0, "ci": [0.0, 0.0], "p": 1.0, "n": 2}


def test_run_measures_skip_missing_epochs():
    history = {"val_accuracy": [0.5, 0.9, None, 0.8], "val_loss": [1.0, 0.3, None, 0.4],
               "accuracy": [0.6, 0.95, 0.97, None], "loss": [0.9, 0.2, 0.1, None]}  # last: an imag epoch
    measures = run_measures(history)
    assert {key: measures[key] for key in ("final_top1", "best_top1", "final_loss", "best_loss", "epochs")} == {
        "final_top1": 0.8, "best_top1": 0.9, "final_loss": 0.4, "best_loss": 0.3, "epochs": 4}
    assert {key: measures[key] for key in ("final_train_top1", "best_train_top1", "final_train_loss",
                                           "best_train_loss")} == {"final_train_top1": 0.97, "best_train_top1": 0.97,
                                                                   "final_train_loss": 0.1, "best_train_loss": 0.1}


def test_the_runs_val_balanced_accuracy_is_a_row_of_the_comparison():
    history = {"val_accuracy": [0.5, 0.8], "val_loss": [1.0, 0.5], "accuracy": [0.6, 0.9], "loss": [0.9, 0.3]}
    balanced = {"normal": [{"balanced_accuracy": 0.5}, {"balanced_accuracy": 0.7}],
                "imag": [{"balanced_accuracy": 0.6}, {"balanced_accuracy": 0.9}]}
    summary = summarize({"normal": [history] * 2, "imag": [history] * 2}, seeds=[0, 1], val_metrics=balanced)
    assert summary["stats"]["normal"]["balanced_accuracy"]["mean"] == pytest.approx(0.6)
    assert summary["differences"]["imag"]["balanced_accuracy"]["mean"] == pytest.approx(0.15)
    assert "| val balanced accuracy of the run's model | 0.6000 ± 0.1414 | 0.7500 ± 0.2121 |" in to_markdown(summary)


def test_compare_normal_and_imag_writes_tables_and_curves(small_cats_dogs, home, tmp_path, monkeypatch):
    recipe = load_recipe({
        "name": "cd-compare", "seed": 0, "strategy": "imag",
        "data": {"train": str(small_cats_dogs), "val": 0.25, "image_size": 64, "batch_size": 8},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "warmup": {"epochs": 0},
        "finetune": {"epochs": 3, "unfreeze": {"from": "conv_dw_13"}, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "imag": {"normal_epochs": 1, "imag_epochs": 1},
        "output": str(tmp_path / "out")})
    summary = compare(recipe, modes=["normal", "imag"], seeds=2)
    folder = tmp_path / "out" / "compare"
    for name in ["compare.json", "compare.md", "curves.png", "runs/normal-seed0/run.json", "runs/imag-seed1/run.json"]:
        assert (folder / name).is_file(), name
    assert json.loads((folder / "runs/imag-seed0/run.json").read_text())["history"]["phase"] == \
        ["finetune", "imag", "finetune"]
    assert [m["epochs"] for m in summary["runs"]["normal"]] == [3, 3]
    difference = summary["differences"]["imag"]["best_top1"]
    normal = [m["best_top1"] for m in summary["runs"]["normal"]]
    imag = [m["best_top1"] for m in summary["runs"]["imag"]]
    assert difference["mean"] == pytest.approx(np.mean(np.subtract(imag, normal)))
    table = (folder / "compare.md").read_text()
    assert "| normal | imag |" in table and "paired t-test p" in table
    for label in ("final train top-1", "best train loss", "final val loss", "val balanced accuracy of the run's model"):
        assert table.count(f"| {label} |") == 2, label
    train = summary["differences"]["imag"]["final_train_loss"]
    assert train["n"] == 2 and np.isfinite(train["mean"]) and len(train["ci"]) == 2

    # A second call reads the finished runs back instead of training again.
    monkeypatch.setattr("transferkit.strategies.finetune.finetune", lambda *a, **k: pytest.fail("retrained"))
    assert compare(recipe, modes=["normal", "imag"], seeds=2)["runs"] == summary["runs"]
    # ... but never the runs of another recipe.
    longer = dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, epochs=4))
    with pytest.raises(RecipeError, match=r"trained with another recipe \(finetune.epochs: 3, now 4\)"):
        compare(longer, modes=["normal", "imag"], seeds=2)


def test_compare_command_usage_errors(tmp_path, small_cats_dogs):
    from test_cli import assert_one_line_error, transferkit

    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {{train: {small_cats_dogs}}}\nbackbone: {{name: mobilenet, alpha: 0.25}}\n")
    assert_one_line_error(transferkit("compare", path, "--modes", "normal,dream"), "give its strategy")
    assert_one_line_error(transferkit("compare", path, "--modes", "normal,normal"), "compare: modes must be")
    assert_one_line_error(transferkit("compare", path, "--set-per-mode", "imag:imag.train"), "MODE:KEY=VALUE")
    assert_one_line_error(transferkit("compare", path, "--set-per-mode", "dream:strategy=imag"),
                          "not among the modes")
    assert_one_line_error(transferkit("compare", path, "--modes", "normal,dream", "--set-per-mode",
                                      "dream:imag.train=body"), "--set-per-mode dream")
    assert transferkit("compare", path, "--seeds", "1").returncode == 2


def test_modes_of_your_own_get_their_settings(tmp_path, small_cats_dogs):
    from transferkit.strategies.compare import mode_recipes

    recipe = load_recipe({"data": {"train": str(small_cats_dogs)}, "backbone": {"name": "mobilenet", "alpha": 0.25},
                          "imag": {"imag_epochs": 1}})
    recipes = mode_recipes(recipe, ["normal", "imag", "imag_head"],
                           {"imag_head": ["strategy=imag", "imag.train=head", "imag.imag_epochs=2"]})
    assert [r.strategy for r in recipes.values()] == ["finetune", "imag", "imag"]
    assert (recipes["imag"].imag.train, recipes["imag_head"].imag.train) == ("head_and_body", "head")
    assert (recipes["imag"].imag.imag_epochs, recipes["imag_head"].imag.imag_epochs) == (1, 2)


def test_three_modes_in_two_processes(small_cats_dogs, home, tmp_path):
    recipe = load_recipe({
        "name": "cd-three", "seed": 0, "strategy": "imag",
        "data": {"train": str(small_cats_dogs), "val": 0.25, "image_size": 32, "batch_size": 8},
        "backbone": {"name": "mobilenet", "alpha": 0.25}, "warmup": {"epochs": 0},
        "finetune": {"epochs": 3, "unfreeze": {"from": "conv_dw_13"}, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "imag": {"normal_epochs": 1, "imag_epochs": 1}, "output": str(tmp_path / "out")})
    summary = compare(recipe, modes=["normal", "imag", "imag_head"], seeds=2, jobs=2,
                      settings={"imag_head": ["strategy=imag", "imag.train=head"]})
    runs = tmp_path / "out" / "compare" / "runs"
    trained = yaml.safe_load((runs / "imag_head-seed1" / "recipe.yaml").read_text())
    assert (trained["imag"]["train"], trained["seed"], trained["strategy"]) == ("head", 1, "imag")
    assert set(summary["differences"]) == {"imag", "imag_head"} and summary["settings"]["imag_head"][1] == "imag.train=head"
    assert "- imag_head: strategy=imag, imag.train=head" in (tmp_path / "out" / "compare" / "compare.md").read_text()
    assert [h["phase"] for h in [json.loads((runs / f"{m}-seed0" / "run.json").read_text())["history"]
                                 for m in ("normal", "imag_head")]] == [["finetune"] * 3, ["finetune", "imag", "finetune"]]

