"""The `transferkit` command as a user runs it: real processes, exit codes, one-line errors."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transferkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def transferkit(*args, cwd=None, env=None, timeout=120):
    """Run `python -m transferkit ARGS` and return the completed process."""
    return subprocess.run([sys.executable, "-m", "transferkit", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("size, similar, expected", [
    ("small", "yes", "feature extraction from the top (pooled) layer + a linear classifier"),
    ("small", "no", "feature extraction from an earlier layer + a linear classifier"),
    ("large", "yes", "warm up a new head on the frozen body, then fine-tune the top blocks"),
    ("large", "no", "fine-tune most or all of the network from the pretrained start"),
])
def test_recommend_each_cell(size, similar, expected):
    result = transferkit("recommend", "--size", size, "--similar", similar)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout and "why:" in result.stdout and "settings:" in result.stdout


def test_recommend_json_is_machine_readable():
    result = transferkit("recommend", "--size", "small", "--similar", "no", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["strategy"] == "extract" and data["recipe"]["extract"]["layer"] == data["settings"]["extract"]["layer"]


def test_recommend_medium_is_a_one_line_usage_error():
    assert_one_line_error(transferkit("recommend", "--size", "medium", "--similar", "yes"),
                          "small", "large", "--size")


def test_recommend_without_similar_says_what_to_pass():
    assert_one_line_error(transferkit("recommend", "--size", "small"), "--similar yes|no")


@pytest.mark.slow
def test_recommend_writes_a_runnable_recipe_with_data(tmp_path, datasets):
    """It also extracts (and caches, in the tests' own TRANSFERKIT_HOME) the features of 500 images."""
    out = tmp_path / "cats.yaml"
    result = transferkit("recommend", "--data", datasets / "cats_dogs", "--similar", "yes", "--write", out,
                         timeout=600)
    assert result.returncode == 0, result.stderr
    assert "median_per_class: 250" in result.stdout and "transferkit extract" in result.stdout
    recipe = load_recipe(out)
    assert recipe.strategy == "extract" and Path(recipe.data.train) == (datasets / "cats_dogs").resolve()


def test_recommend_writes_a_placeholder_to_fill_in(tmp_path):
    out = tmp_path / "r.yaml"
    result = transferkit("recommend", "--size", "large", "--similar", "yes", "--write", out)
    assert result.returncode == 0 and "fill in data.train" in result.stdout
    assert "# FILL IN" in out.read_text()
    assert load_recipe(out).strategy == "finetune"


def test_recommend_writes_the_chosen_backbones_own_layer_names(tmp_path, small_cats_dogs):
    """MobileNet has no block_13_expand: the written recipe names MobileNet's layers, and validates
    once its placeholder data folder is filled in."""
    out = tmp_path / "mobilenet.yaml"
    result = transferkit("recommend", "--size", "large", "--similar", "yes", "--backbone", "mobilenet",
                         "--alpha", "0.25", "--write", out)
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(out.read_text())
    assert written["backbone"] == {"name": "mobilenet", "weights": "imagenet", "alpha": 0.25}
    assert written["finetune"]["unfreeze"]["from"] == "conv_dw_12"
    assert_one_line_error(transferkit("validate", out), "data.train: folder not found", "path/to/images")
    assert transferkit("validate", out, "--set", f"data.train={small_cats_dogs}").returncode == 0


@pytest.mark.parametrize("error, fragments", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/flowers/checkpoint/epoch-3.weights.h5"),
     ["no space left on the disk writing /runs/flowers/checkpoint/epoch-3.weights.h5", "free some space"]),
    (OSError("Can't write data (file write failed: errno = 122, error message = 'Disk quota exceeded')"),
     ["no space left on the disk", "free some space"]),
    (MemoryError(), ["out of memory", "data.batch_size"]),
])
def test_a_full_disk_or_memory_anywhere_is_one_line_and_exit_1(monkeypatch, in_process, error, fragments):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr("transferkit.recipe.load_recipe", fails)
    code, _, message = in_process("validate", "recipe.yaml")
    assert code == 1 and len(message.strip().splitlines()) == 1 and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message


def test_other_errors_keep_their_traceback(monkeypatch, in_process):
    monkeypatch.setattr("transferkit.recipe.load_recipe", lambda *a, **k: open("/nonexistent/dir/file"))
    with pytest.raises(FileNotFoundError):
        in_process("validate", "recipe.yaml")


def test_validate_prints_the_resolved_recipe(tmp_path):
    result = transferkit("validate", ROOT / "recipes" / "digits.yaml", "--set", "data.batch_size=16")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["data"]["batch_size"] == 16 and resolved["data"]["train"] == "builtin:digits"
    assert resolved["finetune"]["optimizer"]["name"] == "sgd"  # defaults filled in
    assert resolved["output"].endswith("runs/digits")


def test_validate_typo_is_a_one_line_error_with_a_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data: {train: photos}\nbakbone: {name: mobilenet_v2}\n")
    assert_one_line_error(transferkit("validate", path), "bakbone", "did you mean backbone?")


def test_backbones_lists_the_registry():
    result = transferkit("backbones")
    assert result.returncode == 0
    for name in ["mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "efficientnet_b3", "efficientnet_v2_b0", "resnet50", "resnet50_v2", "densenet121",
                 "inception_v3", "xception", "vgg16", "convnext_tiny"]:
        assert any(line.split()[0] == name for line in result.stdout.splitlines()), name


def test_backbones_detail_and_unknown_name():
    result = transferkit("backbones", "mobilenet_v2")
    assert result.returncode == 0 and "block_13_expand" in result.stdout
    assert_one_line_error(transferkit("backbones", "mobilenetv2"), "did you mean mobilenet_v2")


def test_help_and_version():
    assert transferkit("--help").returncode == 0
    assert "transferkit recommend --size small --similar yes" in transferkit("recommend", "--help").stdout
    assert "0.1.0" in transferkit("--version").stdout


def test_extract_with_no_cached_weights_fails_fast_naming_the_file(tmp_path, datasets):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{train: {datasets / 'cats_dogs'}}}\nbackbone: {{name: mobilenet_v2}}\n")
    (tmp_path / "empty").mkdir()
    result = transferkit("extract", recipe, env={"KERAS_HOME": str(tmp_path / "empty")})
    assert_one_line_error(result, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                          str(tmp_path / "empty" / "models"))


def test_extract_bad_data_is_a_one_line_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {train: no_such_folder}\nbackbone: {name: mobilenet, alpha: 0.25}\n")
    assert_one_line_error(transferkit("extract", recipe), "no_such_folder", "not found")


@pytest.mark.slow
def test_quickstart_main_job_runs(tmp_path):
    """The README's first command, after its install step: builtin digits, real ImageNet weights."""
    result = transferkit("extract", ROOT / "recipes" / "digits.yaml", "--quiet", cwd=tmp_path,
                         env={"TRANSFERKIT_HOME": str(tmp_path / "home")}, timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs" / "digits" / "val_metrics.json").read_text())
    assert metrics["n"] == 360 and metrics["top1"] > 0.9
    assert "val: top-1" in result.stderr and "Traceback" not in result.stderr
