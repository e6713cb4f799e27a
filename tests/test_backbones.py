"""The backbone registry, offline-aware ImageNet weights, the Preprocess layer and resolve_layer."""

import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from keras.src.utils import file_utils
from PIL import Image

from transferkit.models import backbones, weights
from transferkit.models.backbones import create_backbone, resolve_layer
from transferkit.models.registry import BACKBONES, get_backbone_info, list_backbones
from transferkit.models.weights import keras_home, weights_filename
from transferkit.errors import BackboneError
from transferkit.models.layers import Preprocess

REPO = Path(__file__).resolve().parents[1]
NAMES = list(BACKBONES)
# The ImageNet files in ../shared/keras_home: (backbone, alpha, a conv kernel to compare).
CACHED = [("mobilenet_v2", 1.0, "Conv1"), ("mobilenet", 0.25, "conv1")]


class _Requested(Exception):
    """Raised by the fake get_file once Keras has said which file it wants."""


@pytest.fixture
def requested_file(monkeypatch):
    """Makes keras' get_file record the file name it is asked for, then stop the build."""
    requested = []

    def fake_get_file(fname=None, origin=None, **kwargs):
        requested.append(fname)
        raise _Requested(fname)

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    return requested


@pytest.fixture
def offline(monkeypatch):
    """No download is possible, whatever the machine's network."""
    monkeypatch.setattr(weights, "_download_possible", lambda timeout=2.0: False)


def image_batch(datasets, size):
    path = sorted((datasets / "cats_dogs" / "cat").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype="float32")[None]


def keras_preprocess_input(info):
    """The family's own preprocess_input, from the module that defines its constructor."""
    module = importlib.import_module(getattr(keras.applications, info.constructor).__module__)
    return module.preprocess_input


def run(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


# --- the registry -------------------------------------------------------------------------------

# (name, alpha, image_size, include_top, minimalistic): every entry at its smallest size (MobileNet(V2)
# then ask for their 224 file) and with top at its own size, every alpha, plus the variants whose file
# name depends on size or minimalistic. A Keras upgrade that renames any of these files fails here.
FILE_CASES = [(name, None, BACKBONES[name].min_size, False, False) for name in NAMES] + [
    (name, None, BACKBONES[name].default_size, True, False) for name in NAMES] + [
    (name, alpha, 96 if name == "mobilenet_v2" else 128, False, False)
    for name in NAMES for alpha in BACKBONES[name].alphas] + [
    ("mobilenet", 0.5, 128, True, False), ("mobilenet", 0.75, 192, False, False),
    ("mobilenet_v2", 1.4, 96, False, False), ("mobilenet_v2", 0.35, 160, True, False),
    ("mobilenet_v3_small", 0.75, 64, False, False), ("mobilenet_v3_large", 1.0, 64, True, True),
    ("mobilenet_v3_small", 1.0, 64, False, True),
]


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
@pytest.mark.parametrize("name, alpha, size, include_top, minimalistic", FILE_CASES)
def test_weights_filename_is_the_file_keras_asks_for(requested_file, name, alpha, size, include_top,
                                                     minimalistic):
    info = get_backbone_info(name)
    kwargs = {"alpha": alpha} if alpha else {}
    if minimalistic:
        kwargs["minimalistic"] = True
    with pytest.raises(_Requested):
        getattr(keras.applications, info.constructor)(
            input_shape=(size, size, 3), include_top=include_top, weights="imagenet", **kwargs)
    assert requested_file == [weights_filename(name, alpha, size, include_top, minimalistic)]
    if (alpha, include_top, minimalistic) == (None, False, False):  # what `transferkit backbones` lists
        assert requested_file == [info.weights_file]


@pytest.mark.parametrize("name", NAMES)
def test_cut_points_are_real_layers_shallow_to_deep(name):
    info = get_backbone_info(name)
    model = create_backbone(name, weights=None, image_size=info.min_size)
    names = [layer.name for layer in model.layers]
    assert model.name == name and model.input.shape == (None, info.min_size, info.min_size, 3)
    assert isinstance(model.layers[1], Preprocess) and names[1] == "preprocess"
    assert model.layers[1].mode == info.preprocessing
    positions = [names.index(cut) for cut in info.cut_points]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert 6 <= len(info.cut_points) <= 20 or name == "convnext_tiny"
    assert info.mid_cut in info.cut_points[:-1] and info.finetune_from in names
    assert model.get_layer(info.cut_points[-1]).output is model.output  # the final feature map
    assert resolve_layer(model, "top") == info.cut_points[-1]
    if info.preprocessing is None:  # then the Keras model normalises raw pixels itself
        assert isinstance(model.layers[2], (keras.layers.Rescaling, keras.layers.Normalization))


def test_lookup_is_case_and_separator_insensitive_with_did_you_mean():
    assert get_backbone_info("MobileNet-V2") is BACKBONES["mobilenet_v2"]
    assert [info.name for info in list_backbones()] == NAMES and len(NAMES) == 16
    with pytest.raises(BackboneError, match=r"unknown backbone 'mobilenetv2': did you mean mobilenet_v2\?"):
        get_backbone_info("mobilenetv2")
    with pytest.raises(BackboneError, match="transferkit backbones"):
        create_backbone("resnet51", weights=None)


def test_keras_home_follows_keras(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert keras_home() == tmp_path
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keras_home() == tmp_path / ".keras"


# --- ImageNet weights from ../shared/keras_home, no network ------------------------------------

@pytest.mark.parametrize("name, alpha, kernel", CACHED)
def test_cached_imagenet_weights_match_keras_at_224_and_are_reused_at_160(
        monkeypatch, caplog, datasets, name, alpha, kernel):
    info = get_backbone_info(name)
    with monkeypatch.context() as patch:  # ours must not even ask Keras for a file
        patch.setattr(file_utils, "get_file", lambda *a, **k: pytest.fail("asked Keras to fetch weights"))
        patch.setattr(weights, "_download_possible", lambda timeout=2.0: pytest.fail("probed the network"))
        ours_224 = create_backbone(name, alpha=alpha)
        with caplog.at_level(logging.INFO, logger="transferkit"):
            ours_160 = create_backbone(name, alpha=alpha, image_size=160)
    assert "reusing the 224 px weights" in caplog.text

    constructor = getattr(keras.applications, info.constructor)
    keras_224 = constructor(input_shape=(224, 224, 3), alpha=alpha, include_top=False, weights="imagenet")
    x = image_batch(datasets, 224)
    expected = run(keras_224, keras_preprocess_input(info)(x.copy()))
    np.testing.assert_allclose(run(ours_224, x), expected, atol=1e-4)

    np.testing.assert_array_equal(ours_160.get_layer(kernel).kernel, ours_224.get_layer(kernel).kernel)
    for ours, theirs in zip(ours_160.weights, ours_224.weights):
        np.testing.assert_array_equal(ours, theirs)
    keras_160 = constructor(input_shape=(160, 160, 3), alpha=alpha, include_top=False, weights=None)
    keras_160.load_weights(keras_home() / "models" / weights_filename(name, alpha, 224))
    x = image_batch(datasets, 160)
    np.testing.assert_allclose(run(ours_160, x), run(keras_160, keras_preprocess_input(info)(x.copy())),
                               atol=1e-4)


def test_missing_imagenet_file_names_the_file_and_where_to_put_it(monkeypatch, offline, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(BackboneError) as error:
        create_backbone("mobilenet_v2", image_size=128)
    message = str(error.value)
    assert time.monotonic() - started < 5 and "\n" not in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5" in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message
    assert f"{tmp_path / 'models'}/" in message and "weights: null" in message


def test_missing_imagenet_file_fails_within_5s_of_process_start(tmp_path):
    if weights._download_possible():
        pytest.skip("online: Keras would download the weights instead of failing")
    env = {**os.environ, "KERAS_HOME": str(tmp_path)}
    code = "from transferkit.models.backbones import create_backbone; create_backbone('mobilenet_v2')"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    assert result.returncode != 0 and elapsed < 5, (elapsed, result.stderr)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in result.stderr
    assert f"{tmp_path / 'models'}/" in result.stderr


def test_efficientnet_imagenet_weights_are_left_to_keras(monkeypatch, tmp_path):
    # Keras adds EfficientNet's normalisation fix-up layer only when it loads ImageNet weights itself.
    (tmp_path / "models").mkdir()
    for name in ("efficientnet_b0", "resnet50"):
        (tmp_path / "models" / weights_filename(name)).touch()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    plan = weights._plan_weights
    efficientnet = get_backbone_info("efficientnet_b0")
    assert plan(efficientnet, "imagenet", None, 224, False, False) == (None, "imagenet")
    resnet_file = tmp_path / "models" / weights_filename("resnet50")
    assert plan(get_backbone_info("resnet50"), "imagenet", None, 224, False, False) == (resnet_file, None)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
def test_failed_download_becomes_the_same_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "_download_possible", lambda timeout=2.0: True)

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    with pytest.raises(BackboneError, match=r"mobilenet_v3_small \(alpha 1.0, 64 px\) are not cached"):
        create_backbone("mobilenet_v3_small", image_size=64)


# --- argument errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"name": "resnet50", "alpha": 0.5}, "resnet50 has no width multiplier: drop alpha"),
    ({"name": "mobilenet_v2", "alpha": 0.3}, "alpha 0.35, 0.5, 0.75, 1.0, 1.3, 1.4 only, not 0.3"),
    ({"name": "mobilenet_v3_small", "alpha": 0.75, "minimalistic": True},
     "mobilenet_v3_small with minimalistic: true has ImageNet weights for alpha 1.0 only, not 0.75"),
    ({"name": "inception_v3", "image_size": 64}, "image_size 64 is too small for inception_v3: .* 75 px"),
    ({"name": "vgg16", "image_size": 160, "include_top": True}, "needs image_size 224 for vgg16"),
    ({"name": "convnext_tiny", "weights": None, "drop_path_rate": 0.1},
     "ConvNeXtTiny takes no drop_path_rate"),
    ({"name": "mobilenet_v2", "weights": "/nonexistent/w.weights.h5"},
     "weights file /nonexistent/w.weights.h5 not found"),
])
def test_bad_arguments_are_one_line_errors(offline, kwargs, match):
    with pytest.raises(BackboneError, match=match) as error:
        create_backbone(**kwargs)
    assert "\n" not in str(error.value)


def test_local_weights_file_is_loaded(tmp_path):
    trained = create_backbone("mobilenet_v2", weights=None, image_size=96)
    path = tmp_path / "backbone.weights.h5"
    trained.save_weights(path)
    loaded = create_backbone("mobilenet_v2", weights=str(path), image_size=96)
    for ours, theirs in zip(loaded.weights, trained.weights):
        np.testing.assert_array_equal(ours, theirs)


def test_drop_connect_rate_scales_efficientnet_stochastic_depth():
    default = create_backbone("efficientnet_b0", weights=None, image_size=32)
    doubled = create_backbone("efficientnet_b0", weights=None, image_size=32, drop_connect_rate=0.4)
    rates = [(a.rate, b.rate) for a, b in zip(default.layers, doubled.layers) if a.name.endswith("_drop")]
    assert rates and all(b == pytest.approx(2 * a) for a, b in rates)
    assert len(doubled.layers) == len(default.layers)


# --- the Preprocess layer ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_preprocess_matches_the_family_preprocess_input(name):
    info = get_backbone_info(name)
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    expected = keras_preprocess_input(info)(x.copy())
    np.testing.assert_allclose(run(Preprocess(info.preprocessing), x), expected, rtol=1e-6, atol=1e-4)


def test_preprocess_layer_and_renamed_layers_survive_save_and_load(tmp_path):
    model = create_backbone("mobilenet_v3_small", weights=None, image_size=32)
    model.save(tmp_path / "backbone.keras")
    loaded = keras.saving.load_model(tmp_path / "backbone.keras")
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(run(loaded, x), run(model, x), atol=1e-6)
    assert loaded.get_layer("preprocess").get_config()["mode"] is None
    assert resolve_layer(loaded, "top") == "conv_1_activation"
    for mode in ("tf", "torch", "caffe", None):
        layer = Preprocess.from_config(Preprocess(mode, name="preprocess").get_config())
        assert layer.mode == mode and layer.name == "preprocess"


# --- resolve_layer -------------------------------------------------------------------------------

def test_resolve_layer_top_names_and_did_you_mean():
    model = create_backbone("mobilenet_v2", weights=None, image_size=32)
    assert resolve_layer(model, "top") == "out_relu"
    assert resolve_layer(model, "block_12_add") == "block_12_add"
    hint = r"did you mean block_13_expand\? \(cut points: top, block_1_project_BN"
    with pytest.raises(BackboneError, match=hint):
        resolve_layer(model, "block_13_expnd")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")], name="plain")
    with pytest.raises(BackboneError, match="not a transferkit backbone"):
        resolve_layer(plain, "top")


# --- layer names without weights, for checking recipes ---------------------------------------------

def test_layer_names_are_the_built_models_and_leave_keras_auto_names_alone():
    """MobileNetV3 has auto-named layers ("activation", "re_lu"): building for the names must not shift
    the names of the model built next."""
    names = backbones.layer_names("mobilenet_v3_small", alpha=0.75)
    model = create_backbone("mobilenet_v3_small", weights=None, alpha=0.75)
    assert names == tuple(layer.name for layer in model.layers)
    assert backbones.layer_names("mobilenet_v3_small", alpha=0.75) is names  # cached per process


def test_check_layer_answers_registry_names_without_building(monkeypatch):
    monkeypatch.setattr(backbones, "create_backbone", None)  # would fail if anything were built
    for name, info in BACKBONES.items():
        for layer in ("top", info.mid_cut, info.finetune_from, *info.cut_points):
            backbones.check_layer(name, layer, "extract.layer")


def test_check_layer_builds_once_for_other_names_and_suggests_the_closest():
    backbones.check_layer("mobilenet_v2", "block_5_depthwise", "finetune.unfreeze.from", alpha=0.35)
    with pytest.raises(BackboneError) as error:
        backbones.check_layer("mobilenet_v2", "block_5_depthwse", "finetune.unfreeze.from", alpha=0.35)
    message = str(error.value)
    assert message.startswith("finetune.unfreeze.from: mobilenet_v2 has no layer 'block_5_depthwse': "
                              "did you mean block_5_depthwise?")
    assert "cut points: top, block_1_project_BN" in message and "block_13_expand" in message
