import time
from pathlib import Path

import pytest
import yaml

from transferkit.errors import RecipeError
from transferkit.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path, text, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(source, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name and Path(recipe.output).is_absolute()


def test_defaults_are_filled_in(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: photos}\n"))
    assert recipe.name == "recipe"
    assert recipe.strategy == "extract"
    assert recipe.backbone.name == "mobilenet_v2" and recipe.backbone.weights == "imagenet"
    assert recipe.data.val == 0.2 and recipe.data.batch_size == 32 and recipe.data.image_size is None
    assert recipe.finetune.optimizer.name == "sgd" and recipe.finetune.optimizer.nesterov is True
    assert recipe.warmup.optimizer.name == "rmsprop"
    assert recipe.extract.layer == "top" and recipe.extract.classifier.name == "logistic_regression"
    assert recipe.output == str(Path.cwd().resolve() / "runs" / "recipe")


def test_defaults_are_not_shared_between_recipes(tmp_path):
    first = load_recipe({"data": {"train": "a"}})
    first.finetune.optimizer.options["beta_1"] = 0.5
    first.data.augment.append("random_flip")
    second = load_recipe({"data": {"train": "a"}})
    assert second.finetune.optimizer.options == {} and second.data.augment == []


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    recipe = load_recipe(write(tmp_path / "sub", "data: {train: ../photos, val: held_out, test: 0.1}\n"
                                                 "backbone: {weights: w/my.weights.h5}\noutput: out\n"))
    assert recipe.data.train == str((tmp_path / "photos").resolve())
    assert recipe.data.val == str((tmp_path / "sub" / "held_out").resolve())
    assert recipe.data.test == 0.1
    assert recipe.backbone.weights == str((tmp_path / "sub" / "w" / "my.weights.h5").resolve())
    assert recipe.output == str((tmp_path / "sub" / "out").resolve())


def test_builtin_data_and_imagenet_weights_are_not_paths(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: 'builtin:digits'}\n"))
    assert recipe.data.train == "builtin:digits" and recipe.backbone.weights == "imagenet"


def test_null_weights_mean_random_init(tmp_path):
    assert load_recipe(write(tmp_path, "data: {train: a}\nbackbone: {weights: null}\n")).backbone.weights is None


def test_unknown_top_level_key_suggests_the_right_one(tmp_path):
    message = error_of(write(tmp_path, "data: {train: a}\nbakbone: {name: resnet50}\n"))
    assert "unknown key bakbone" in message and "did you mean backbone?" in message
    assert "recipe.yaml" in message


def test_unknown_nested_key_gives_its_full_path(tmp_path):
    message = error_of(write(tmp_path, "data: {train: a}\nfinetune: {optimzer: {name: adam}}\n"))
    assert "unknown key finetune.optimzer" in message and "did you mean finetune.optimizer?" in message


def test_unknown_key_with_no_close_match_lists_the_valid_ones():
    message = error_of({"data": {"train": "a"}, "head": {"zzz": 1}})
    assert "unknown key head.zzz" in message and "pooling" in message and "layers" in message


@pytest.mark.parametrize("text, expected", [
    ("data: {train: a, batch_size: many}", "data.batch_size: expected a whole number >= 1 and <= 8192, got text 'many'"),
    ("data: {train: a, batch_size: 0}", "data.batch_size: expected a whole number >= 1 and <= 8192, got 0"),
    ("data: {train: a, batch_size: 2.5}", "data.batch_size: expected a whole number, got 2.5"),
    ("data: {train: a, val: 1.5}", "data.val: expected a number > 0 and < 1, got 1.5"),
    ("data: {train: a, val: [1]}", "data.val: expected a number > 0 and < 1 or a path or null, got a list"),
    ("data: {train: a}\nstrategy: finetnue", "strategy: expected one of extract, finetune, imag, got 'finetnue': did you mean finetune?"),
    ("data: {train: a}\nhead: {layers: [{dense: 0}]}", "head.layers[0].dense: expected a whole number >= 1 and <= 65536, got 0"),
    ("data: {train: a}\nhead: {layers: [{units: 5}]}", "unknown key head.layers[0].units"),
    ("data: {train: a}\nfinetune: {optimizer: {learning_rate: -1}}", "finetune.optimizer.learning_rate: expected a number > 0, got -1.0"),
    ("data: {train: a}\nfinetune: {label_smoothing: 1}", "finetune.label_smoothing: expected a number >= 0 and < 1, got 1.0"),
    ("data: {train: a}\nextract: {tta: sometimes}", "extract.tta: expected true or false, got 'sometimes'"),
    ("data: {train: 7}", "data.train: expected a path, got a number 7"),
    ("data: [a, b]", "data: expected a mapping, got a list"),
    ("backbone: {name: resnet50}", "missing key data"),
    ("data: {}", "missing key data.train"),
])
def test_wrong_types_and_ranges_name_key_value_and_expectation(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text + "\n"))


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: a}\nfinetune: {optimizer: {learning_rate: 1e-4}}\n"))
    assert recipe.finetune.optimizer.learning_rate == pytest.approx(1e-4)


def test_shorthands(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: a}\nwarmup: {optimizer: adamw}\n"
                                         "finetune: {unfreeze: all, schedule: sgdr, early_stopping: {patience: 2}}\n"
                                         "extract: {classifier: linear_svm, layer: [block_6_add, top]}\n"))
    assert recipe.warmup.optimizer.name == "adamw" and recipe.warmup.optimizer.learning_rate == 1e-3
    assert recipe.finetune.unfreeze.all is True and recipe.finetune.schedule.name == "sgdr"
    assert recipe.finetune.early_stopping.patience == 2
    assert recipe.extract.classifier.name == "linear_svm"
    assert recipe.extract.layer == ["block_6_add", "top"]


def test_unfreeze_from_uses_the_yaml_key_from(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: a}\nfinetune: {unfreeze: {from: block_13_expand}}\n"))
    assert recipe.finetune.unfreeze.from_layer == "block_13_expand"
    assert recipe.to_dict()["finetune"]["unfreeze"]["from"] == "block_13_expand"


def test_unfreeze_takes_only_one_rule():
    assert "give one of from, top_blocks, fraction, all" in error_of(
        {"data": {"train": "a"}, "finetune": {"unfreeze": {"from": "x", "top_blocks": 2}}})


def test_unknown_augmentation_suggests_a_name():
    message = error_of({"data": {"train": "a", "augment": ["random_flip", {"random_rotaton": 0.1}]}})
    assert "data.augment[1]" in message and "did you mean random_rotation?" in message


def test_overrides_apply_on_top(tmp_path):
    path = write(tmp_path, "data: {train: a}\nfinetune: {epochs: 10}\n")
    recipe = load_recipe(path, overrides=["finetune.epochs=2", "data.batch_size=8", "head.l2=1e-4"])
    assert (recipe.finetune.epochs, recipe.data.batch_size, recipe.head.l2) == (2, 8, 1e-4)
    assert "finetune.epochs: expected a whole number >= 0 and <= 10000" in error_of(path, overrides=["finetune.epochs=x"])
    assert "expected key.path=value" in error_of(path, overrides=["finetune.epochs"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "flowers5_finetune.yaml")
    again = load_recipe(yaml.safe_load(recipe.to_yaml()))
    assert isinstance(again, Recipe) and again == recipe


def test_missing_file_and_bad_yaml(tmp_path):
    assert "recipe not found" in error_of(tmp_path / "nope.yaml")
    assert "not valid YAML at line 3" in error_of(write(tmp_path, "data:\n  train: [a\n"))
    assert "expected a mapping of keys" in error_of(write(tmp_path, "- a\n- b\n"))


def test_data_cache_is_true_false_auto_or_a_number_of_images():
    for value in (True, False, "auto", 5000):
        assert load_recipe({"data": {"train": "builtin:digits", "cache": value}}).data.cache == value
    assert "data.cache: expected a whole number >= 0, got -1" in error_of({"data": {"train": "builtin:digits",
                                                                                 "cache": -1}})
    assert "data.cache: expected one of auto, got 'maybe'" in error_of({"data": {"train": "builtin:digits",
                                                                                "cache": "maybe"}})


# --- what load_recipe checks before anything else: finite numbers, bounds, the YAML itself --------

def test_an_alias_bomb_is_refused_in_milliseconds(tmp_path):
    lines = ["data: {train: a}", "backbone:", "  options:", "    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    {name}: &{name} [{', '.join([f'*{previous}'] * 9)}]"
              for previous, name in zip("abcdefgh", "bcdefghi")]
    path = write(tmp_path, "\n".join(lines) + "\n")
    started = time.monotonic()
    message = error_of(path)
    assert time.monotonic() - started < 1
    assert "aliases (*name) expand to more than 100,000 values" in message and str(path) in message


def test_aliases_that_stay_small_are_fine_and_recursive_ones_are_not(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: a}\nwarmup: {optimizer: &opt {name: adam}}\n"
                                         "finetune: {optimizer: *opt}\n"))
    assert recipe.warmup.optimizer == recipe.finetune.optimizer and recipe.finetune.optimizer.name == "adam"
    recursive = write(tmp_path, "data: {train: a}\nbackbone: {options: &o {x: *o}}\n", name="recursive.yaml")
    assert "refers to its own anchor" in error_of(recursive)


def test_unreadable_files_are_one_line(tmp_path):
    assert "nested too deeply" in error_of(write(tmp_path, "data: {train: a}\nx: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert "too big for a recipe" in error_of(write(tmp_path, "# " + "x" * 2**20 + "\n"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"data: {train: caf\xe9}\n")
    assert "not UTF-8 text (byte 0xe9 at line 1)" in error_of(latin1)
    assert "not valid YAML" in error_of(write(tmp_path, "data: {train: a}\nname: \x01\n"))


@pytest.mark.parametrize("text, expected", [
    ("finetune: {epochs: .nan}", "finetune.epochs: expected a finite whole number >= 0 and <= 10000, got nan"),
    ("finetune: {epochs: 1e400}", "finetune.epochs: expected a finite whole number >= 0 and <= 10000, got 1e400"),
    ("finetune: {epochs: 1e9}", "finetune.epochs: expected a whole number >= 0 and <= 10000, got 1000000000 (a run"),
    ("finetune: {optimizer: {learning_rate: .inf}}", "finetune.optimizer.learning_rate: expected a finite number > 0"),
    ("finetune: {mixup: -.inf}", "finetune.mixup: expected a finite number >= 0, got -inf"),
    ("imag: {normal_epochs: 20000}", "imag.normal_epochs: expected a whole number >= 1 and <= 10000"),
    ("seed: -1", "seed: expected a whole number >= 0 and <= 4294967295, got -1"),
    ("head: {layers: [{dense: 1000000}]}", "head.layers[0].dense: expected a whole number >= 1 and <= 65536"),
    ("backbone: {options: {rate: [0.1, .nan]}}", "backbone.options.rate[1]: expected a finite number, got nan"),
    ("extract: {classifier: {grid: {C: [1, .inf]}}}", "extract.classifier.grid.C[1]: expected a finite number"),
])
def test_numbers_are_finite_and_bounded(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, "data: {train: a}\n" + text + "\n"))


def test_image_size_bound_says_why():
    message = error_of({"data": {"train": "a", "image_size": 100000}})
    assert "data.image_size: expected a whole number >= 8 and <= 4096, got 100000" in message
    assert "192 MiB" in message and "memory" in message


def test_setting_one_unfreeze_mode_replaces_the_recipes_mode(tmp_path):
    path = write(tmp_path, "data: {train: a}\nfinetune: {unfreeze: {from: block_13_expand, train_batchnorm: true}}\n")
    unfreeze = load_recipe(path, overrides=["finetune.unfreeze.all=true"]).finetune.unfreeze
    assert unfreeze.mode() == ("all", True) and unfreeze.train_batchnorm is True
    assert load_recipe(path, overrides=["finetune.unfreeze.top_blocks=2"]).finetune.unfreeze.mode() == ("top_blocks", 2)
    assert load_recipe(path, overrides=["finetune.unfreeze=all"]).finetune.unfreeze.mode() == ("all", True)
    shorthand = write(tmp_path, "data: {train: a}\nfinetune: {unfreeze: all}\n", name="all.yaml")
    assert load_recipe(shorthand, overrides=["finetune.unfreeze.fraction=0.5"]).finetune.unfreeze.mode() == \
        ("fraction", 0.5)
    # turning a mode off chooses none, and two modes in one command or in the file stay an error
    assert load_recipe(path, overrides=["finetune.unfreeze.all=false"]).finetune.unfreeze.mode() == \
        ("from", "block_13_expand")
    assert "finetune.unfreeze.all and .fraction: give one of" in error_of(
        path, overrides=["finetune.unfreeze.all=true", "finetune.unfreeze.fraction=0.5"])


def test_override_values_that_are_not_yaml_name_the_override(tmp_path):
    path = write(tmp_path, "data: {train: a}\n")
    message = error_of(path, overrides=["data.val=[1,"])
    assert message.startswith("override 'data.val=[1,': the value: not valid YAML") and "quote text" in message
    assert load_recipe(path, overrides=["data.val='held out'"]).data.val.endswith("held out")


def test_follow_links_is_off_unless_asked_for():
    assert load_recipe({"data": {"train": "a"}}).data.follow_links is False
    assert load_recipe({"data": {"train": "a", "follow_links": True}}).data.follow_links is True
    assert "data.follow_links: expected true or false" in error_of({"data": {"train": "a", "follow_links": "yes"}})
