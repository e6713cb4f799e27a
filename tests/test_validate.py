"""`transferkit validate` is the whole check: what a run would trip over before or after its slow
work, validate finds first, as one line and exit code 2. Nothing here trains or reads an image."""

import os
import shutil
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from conftest import DATASETS
from test_cli import assert_one_line_error, transferkit

from transferkit.errors import RecipeError
from transferkit.recipe import load_recipe
from transferkit.strategies import check_recipe

BACKBONE = "backbone: {name: mobilenet, alpha: 0.25}\n"
MOBILENET = "data: {train: photos}\n" + BACKBONE


def write(tmp_path, text: str, name="recipe.yaml"):
    """A recipe file: ``text``, after MobileNet (alpha 0.25) and a data section unless it has its own;
    beside it ``photos/``, 4 real cats and 4 real dogs."""
    photos(tmp_path)
    path = tmp_path / name
    path.write_text(text if text.startswith(("data:", "backbone:")) else
                    (BACKBONE if "data:" in text else MOBILENET) + text)
    return path


def photos(folder: Path, per_class: int = 4) -> Path:
    root = folder / "photos"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for path in sorted((DATASETS / "cats_dogs" / cls).iterdir())[:per_class]:
            shutil.copyfile(path, root / cls / path.name)
    return root


def alias_bomb() -> str:
    """A "billion laughs" in backbone.options: under 1 KB of YAML, 9**9 values once expanded."""
    lines = ["data: {train: photos}", "backbone:", "  name: mobilenet", "  alpha: 0.25", "  options:",
             "    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    {name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


# --- through the real command: what fails while the recipe is read, fails in a second -------------

@pytest.mark.parametrize("text, fragments", [
    (alias_bomb(), ["aliases", "100,000 values"]),
    ("strategy: finetune\nfinetune: {epochs: 1e9, schedule: {name: function, function: 'm:f'}}\n",
     ["finetune.epochs", "<= 10000", "1000000000"]),
])
def test_alias_bomb_and_huge_epochs_fail_at_validate_within_a_second(tmp_path, text, fragments):
    path = write(tmp_path, text)
    assert len(path.read_bytes()) < 1024
    started = time.monotonic()
    result = transferkit("validate", path)
    assert_one_line_error(result, str(path), *fragments)
    # the process start (Python, transferkit) included: generous for a busy machine, where the
    # unbounded versions ran for minutes; the check itself takes milliseconds (see test_recipe)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("text, overrides, fragments", [
    ("finetune: {epochs: .nan}\n", [], ["finetune.epochs: expected a finite whole number", "nan"]),
    ("finetune: {epochs: .inf}\n", [], ["finetune.epochs: expected a finite whole number", "inf"]),
    ("finetune: {epochs: 1e400}\n", [], ["finetune.epochs", "got 1e400"]),
    ("finetune: {optimizer: {learning_rate: .inf}}\n", [],
     ["finetune.optimizer.learning_rate: expected a finite number > 0, got inf"]),
    ("warmup: {optimizer: {name: adam, learning_rate: 1e400}}\n", [], ["warmup.optimizer.learning_rate", "1e400"]),
    ("data: {train: photos}\nbackbone: {name: mobilenet, options: {x: .nan}}\n", [], ["backbone.options.x", "finite"]),
    ("data: {train: photos, image_size: 100000}\n", [], ["data.image_size", "<= 4096", "100000", "memory"]),
    ("data: {train: photos, batch_size: 1e9}\n", [], ["data.batch_size", "<= 8192"]),
    ("", ["data.val=[1,"], ["override 'data.val=[1,'", "not valid YAML", "quote text"]),
    ("", ["finetune.unfreeze.from=a", "finetune.unfreeze.all=true"], ["finetune.unfreeze", "give one of"]),
    ("finetune: {unfreeze: {from: conv_dw_12, top_blocks: 2}}\n", [],
     ["finetune.unfreeze: give one of from, top_blocks, fraction, all; got from, top_blocks"]),
    ("x: &x [*x]\n", [], ["refers to its own anchor"]),
])
def test_bad_numbers_yaml_and_overrides_are_one_line_at_validate(tmp_path, text, overrides, fragments):
    args = [arg for override in overrides for arg in ("--set", override)]
    assert_one_line_error(transferkit("validate", write(tmp_path, text), *args), *fragments)


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MOBILENET.encode() + "name: café\n".encode("latin-1"))  # line 3
    assert_one_line_error(transferkit("validate", path), str(path), "not UTF-8", "line 3", "save the recipe as UTF-8")


def test_a_layer_the_backbone_lacks_fails_at_validate(tmp_path):
    """What `recommend` writes for MobileNetV2, run with MobileNet: it used to die after warm-up."""
    path = write(tmp_path, "strategy: finetune\nfinetune: {unfreeze: {from: block_13_expand}}\n")
    assert_one_line_error(transferkit("validate", path), f"error: {path}: finetune.unfreeze.from: mobilenet has no "
                          "layer 'block_13_expand'", "conv_dw_12")


def test_the_commands_that_run_a_recipe_check_it_first_and_name_it(tmp_path, in_process):
    path = write(tmp_path, "extract: {layer: conv_pw_99_relu}\n")  # no data folder either: the layer fails first
    code, _, error = in_process("extract", path)
    assert code == 2 and error.startswith(f"error: {path}: extract.layer: mobilenet has no layer"), error


# --- the checks that need Python objects: through the command's entry point, in this process -------

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module of the user's own functions, as a recipe names them."""
    (tmp_path / "my_code.py").write_text(textwrap.dedent("""
        def head_without_classes(features):
            return features

        def head(features, num_classes):
            raise AssertionError("validate never calls it")

        def constant_lr(epoch, lr):
            return lr

        def lr_that_stops_at_epoch_3(epoch, lr):
            return None if epoch == 3 else lr
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_code"
    sys.modules.pop("my_code", None)


@pytest.mark.parametrize("text, fragments", [
    ("extract: {classifier: {name: 'sys:exit'}}",
     ["extract.classifier.name: 'sys:exit'", "scikit-learn classifier class"]),
    ("extract: {classifier: logistic_regresion}", ["did you mean logistic_regression?"]),
    ("extract: {classifier: {name: logistic_regression, params: {CC: 1}}}", ["extract.classifier.params", "'CC'"]),
    ("extract: {layer: block_12_add}", ["extract.layer: mobilenet has no layer 'block_12_add'"]),
    ("extract: {layer: [top, conv_pw_6_relu, conv_dw_99]}", ["extract.layer[2]", "conv_dw_99"]),
    ("strategy: finetune\nfinetune: {optimizer: adabelief}",
     ["finetune.optimizer.name: unknown optimizer 'adabelief'", "adam"]),
    ("strategy: finetune\nwarmup: {optimizer: {name: adam, options: {amsgrd: true}}}",
     ["warmup.optimizer.options.amsgrd", "did you mean amsgrad?"]),
    ("strategy: finetune\nfinetune: {schedule: {name: function, function: 'nosuch:fn'}}",
     ["finetune.schedule.function: cannot import 'nosuch:fn'"]),
    ("strategy: finetune\nfinetune: {schedule: {name: function, function: 'my_code:head_without_classes'}}",
     ["finetune.schedule.function", "takes (features)", "fn(epoch, lr)"]),
    ("strategy: finetune\nfinetune: {schedule: {name: function, function: 'my_code:lr_that_stops_at_epoch_3'}}",
     ["finetune.schedule.function", "returned None for epoch 3"]),
    ("strategy: finetune\nhead: {custom: 'my_code:head_without_classes'}",
     ["head.custom: 'my_code:head_without_classes' takes (features)", "head(features, num_classes)"]),
    ("strategy: finetune\nhead: {layers: [{dense: 8, activation: relux}]}", ["head.layers[0].activation", "relux"]),
    ("strategy: imag\nimag: {head: {layers: [{dense: 4, activation: nope}]}}",
     ["imag.head.layers[0].activation"]),
    ("data: {train: photos, augment: [{random_rotation: {factr: 0.1}}]}\nstrategy: finetune",
     ["data.augment[0]", "random_rotation", "factr"]),
    ("strategy: finetune\nfinetune: {early_stopping: {monitor: val_acc}}",
     ["finetune.early_stopping.monitor: 'val_acc' is not logged: did you mean val_accuracy?"]),
    ("strategy: finetune\nfinetune: {unfreeze: {top_blocks: 14}}", ["finetune.unfreeze.top_blocks: 14", "1 to 13"]),
    ("strategy: finetune\nwarmup: {linear_probe: true}\nhead: {layers: [{dense: 8}]}", ["warmup.linear_probe"]),
])
def test_what_used_to_fail_after_the_slow_work_fails_at_validate(tmp_path, in_process, user_module, text, fragments):
    code, _, error = in_process("validate", write(tmp_path, text + "\n"))
    assert code == 2 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    for fragment in fragments:
        assert fragment in error


@pytest.mark.parametrize("text", [
    "strategy: finetune\nfinetune: {unfreeze: {from: conv_dw_12}, schedule: {name: function, "
    "function: 'my_code:constant_lr'}, early_stopping: {monitor: val_accuracy}}\nhead: {custom: 'my_code:head'}",
    "extract: {layer: [conv_pw_6_relu, conv_dw_7, top]}",  # conv_dw_7 is no cut point, but a layer
    "strategy: finetune\nfinetune: {unfreeze: {top_blocks: 13}}",
    "data: {train: photos, augment: [random_flip, {random_zoom: 0.1}]}\nstrategy: imag\nfinetune: {unfreeze: all}",
])
def test_a_sound_recipe_validates(tmp_path, in_process, user_module, text):
    code, out, error = in_process("validate", write(tmp_path, text + "\n"))
    assert code == 0 and "backbone:" in out, error


def test_validate_lists_the_data_without_reading_it(tmp_path, in_process):
    path = write(tmp_path, "data: {train: photos, val: 0.25}\n" + BACKBONE)
    os.symlink("..", tmp_path / "photos" / "cat" / "loop")
    os.mkfifo(tmp_path / "photos" / "dog" / "x.jpg")
    (tmp_path / "photos" / "dog" / "broken.jpg").write_bytes(b"not an image")  # decoded only by the run
    with pytest.warns(UserWarning, match=r"skipped 2 files .*cat/loop \(link to the folder.*dog/x.jpg \(not a regular"):
        code, out, error = in_process("validate", path)
    assert code == 0 and "backbone:" in out, error
    assert "data: 2 classes; images: train 6, val 3; 2 files skipped (listed above)" in error


@pytest.mark.parametrize("data, fragments", [
    ("{train: nowhere}", ["data.train: folder not found", "nowhere"]),
    ("{train: photos/cat}", ["data.train: no class folders in"]),
    ("{train: photos, val: 0.1}", ["data.val: cannot split 1 of the 8 images", "at least one image of each of the 2"]),
    ("{train: photos, val: photos}", ["data.val", "photos"]),
])
def test_data_that_cannot_make_a_run_fails_at_validate(tmp_path, in_process, data, fragments):
    code, _, error = in_process("validate", write(tmp_path, f"data: {data}\n" + BACKBONE))
    assert code == 2 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert error.startswith(f"error: {tmp_path / 'recipe.yaml'}: ")
    for fragment in fragments:
        assert fragment in error


def test_an_imag_mapping_naming_a_class_the_data_lacks_fails_at_validate(tmp_path, in_process):
    code, _, error = in_process("validate", write(tmp_path, "strategy: imag\nimag: {mapping: {cta: dog}}\n"))
    assert code == 2 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert "imag.mapping: unknown class 'cta': did you mean cat?" in error


def test_a_one_way_imag_mapping_is_allowed_with_a_warning(tmp_path, in_process):
    with pytest.warns(UserWarning, match=r"imag.mapping merges classes in imag episodes \(cat\+dog -> dog\)"):
        code, out, error = in_process("validate", write(tmp_path, "strategy: imag\nimag: {mapping: {cat: dog}}\n"))
    assert code == 0 and "mapping:" in out, error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, error = in_process("validate", write(tmp_path, "strategy: imag\nimag: {mapping: {cat: dog, dog: cat}}\n"))
    assert code == 0, error
    assert not [w for w in caught if "imag.mapping" in str(w.message)]  # a permutation says nothing


def test_set_one_unfreeze_mode_replaces_the_recipes_mode(tmp_path, in_process):
    path = write(tmp_path, "strategy: finetune\nfinetune: {unfreeze: {from: block_13_expand}}\n")
    code, out, _ = in_process("validate", path, "--set", "finetune.unfreeze.all=true")
    assert code == 0 and "all: true" in out and "block_13_expand" not in out


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_shipped_recipes_pass_the_whole_check(path):
    recipe = load_recipe(path)
    assert check_recipe(recipe) == recipe.data.image_size


def test_compare_checks_every_mode_before_the_first_run(tmp_path):
    from transferkit.strategies.compare import compare

    recipe = load_recipe(write(tmp_path, "strategy: finetune\nimag: {head: {layers: [{dense: 4, activation: nope}]}}\n"))
    with pytest.raises(RecipeError, match=r"imag\.head\.layers\[0\]\.activation"):
        compare(recipe, modes=["normal", "imag"], seeds=2, output=tmp_path / "comparison")
    assert not (tmp_path / "comparison").exists()


def test_finetune_with_its_own_backbone_checks_the_recipe_before_building_it(tmp_path, user_module):
    from transferkit.strategies.finetune import finetune

    recipe = load_recipe(write(tmp_path, "strategy: finetune\nfinetune: {unfreeze: {from: my_own_layer}, "
                                         "schedule: {name: function, function: 'nosuch:fn'}}\n"))
    with pytest.raises(RecipeError, match="finetune.schedule.function: cannot import 'nosuch:fn'"):
        finetune(recipe, backbone=lambda: pytest.fail("the backbone was built before the recipe was checked"))
    fixed = load_recipe(write(tmp_path, "strategy: finetune\nfinetune: {unfreeze: {from: my_own_layer}}\n"))
    check_recipe(fixed, own_backbone=True)  # layer names belong to the caller's model: not checked here


def test_any_recipe_seed_seeds_the_imag_episodes():
    from transferkit.strategies.finetune import episode_seed

    seeds = [episode_seed(2**32 - 1, episode) for episode in (1, 2, 3)]
    assert all(0 <= seed < 2**32 for seed in seeds) and len(set(seeds)) == 3
