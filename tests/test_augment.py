"""transferkit.data.augment: recipe specs to Keras augmentation layers."""

import importlib
import sys
import textwrap

import numpy as np
import pytest

from transferkit.data.augment import (AUGMENTATIONS, BatchMixer, VALUE_RANGE, build_augmentation, check_augmentation,
                                 parse_augment_spec)
from transferkit.errors import RecipeError, TransferkitError

# one working spec per augmentation, for the layers that need an argument
SPECS = {
    "random_rotation": {"random_rotation": 0.1},
    "random_zoom": {"random_zoom": 0.1},
    "random_translation": {"random_translation": 0.1},
    "random_crop": {"random_crop": 24},
    "random_contrast": {"random_contrast": 0.2},
    "random_brightness": {"random_brightness": 0.2},
    "random_hue": {"random_hue": 0.2},
    "random_saturation": {"random_saturation": 0.2},
    "random_color_degeneration": {"random_color_degeneration": 0.2},
    "random_sharpness": {"random_sharpness": 0.2},
    "random_posterization": {"random_posterization": 4},
    "random_color_jitter": {"random_color_jitter": {"brightness_factor": 0.2, "hue_factor": 0.1}},
    "random_shear": {"random_shear": {"x_factor": 0.2, "y_factor": 0.2}},
}


@pytest.mark.parametrize("spec, expected", [
    ("random_flip", ("random_flip", {})),
    ({"random_flip": None}, ("random_flip", {})),
    ({"random_flip": "horizontal"}, ("random_flip", {"mode": "horizontal"})),
    ({"random_rotation": 0.1}, ("random_rotation", {"factor": 0.1})),
    ({"random_zoom": [-0.2, 0.1]}, ("random_zoom", {"height_factor": [-0.2, 0.1]})),
    ({"random_crop": 200}, ("random_crop", {"height": 200, "width": 200})),
    ({"random_translation": 0.1}, ("random_translation", {"height_factor": 0.1, "width_factor": 0.1})),
    ({"rand_augment": 0.7}, ("rand_augment", {"factor": 0.7})),
    ({"rand_augment": {"factor": 0.5, "num_ops": 3}}, ("rand_augment", {"factor": 0.5, "num_ops": 3})),
    ({"random_resized_crop": 0.35}, ("random_resized_crop", {"scale": 0.35})),
    ("keras.layers.RandomFlip", ("keras.layers.RandomFlip", {})),
    ({"keras.layers:RandomZoom": 0.2}, ("keras.layers:RandomZoom", {"height_factor": 0.2})),
])
def test_parse_augment_spec_forms(spec, expected):
    assert parse_augment_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("random_flp", "unknown augmentation 'random_flp': did you mean 'random_flip'?"),
    ({"randaugment": {}}, "did you mean 'rand_augment'?"),
    ("mix_up", "unknown augmentation 'mix_up': choose from .*, or give the import path of a Keras layer class"),
    ({"random_flip": "horizontal", "random_zoom": 0.1}, r"expected a name or \{name: arguments\}"),
    (["random_flip"], "expected a name"),
    ({"auto_contrast": 1}, "'auto_contrast' takes no main argument"),
])
def test_parse_augment_spec_errors(spec, message):
    with pytest.raises(RecipeError, match=message) as raised:
        parse_augment_spec(spec)
    assert isinstance(raised.value, TransferkitError) and "\n" not in str(raised.value)


def _class_name(path: str) -> str:
    return path.replace(":", ".").rpartition(".")[2]


def test_table_names_real_layer_classes_and_covers_the_usual_ones():
    import keras

    usual = ("random_flip random_rotation random_zoom random_translation random_contrast random_brightness "
             "random_crop random_resized_crop random_grayscale random_hue random_saturation random_color_jitter "
             "random_sharpness random_shear random_erasing random_gaussian_blur random_perspective rand_augment "
             "aug_mix solarization auto_contrast equalization").split()
    assert set(usual) <= set(AUGMENTATIONS)
    for path in AUGMENTATIONS.values():
        module, _, name = path.replace(":", ".").rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), keras.layers.Layer), path


def test_every_augmentation_runs_on_raw_pixels():
    pipeline = build_augmentation([SPECS.get(name, name) for name in AUGMENTATIONS], seed=0)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    out = np.asarray(pipeline(images, training=True))
    assert out.shape == (4, 24, 24, 3) and np.isfinite(out).all()
    assert out.max() > 1.5  # still 0..255 pixels, not squashed to 0..1
    assert [type(layer).__name__ for layer in pipeline.layers] == [_class_name(p) for p in AUGMENTATIONS.values()]


def test_value_range_and_seeds_are_passed():
    pipeline = build_augmentation(["random_flip", {"rand_augment": {"factor": 0.5}}, {"random_contrast": 0.2},
                                   {"random_brightness": {"factor": 0.1, "value_range": (0, 1), "seed": 7}}],
                                  seed=10)
    flip, rand_augment, contrast, brightness = pipeline.layers
    assert not hasattr(flip, "value_range")
    assert tuple(rand_augment.value_range) == tuple(contrast.value_range) == VALUE_RANGE
    assert tuple(brightness.value_range) == (0, 1)  # the user's choice is kept
    assert (flip.seed, rand_augment.seed, contrast.seed, brightness.seed) == (10, 11, 12, 7)


def test_rand_augment_keeps_pixels_in_0_255():
    pipeline = build_augmentation([{"rand_augment": {"factor": 0.9, "num_ops": 3}}], seed=0)
    images = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    out = np.asarray(pipeline(images, training=True))
    assert out.min() >= 0 and out.max() <= 255 and out.max() > 100


@pytest.mark.parametrize("specs, message", [
    ([{"random_flip": {"mod": "horizontal"}}], "augmentation 'random_flip': unknown argument 'mod' "
                                                r"\(did you mean 'mode'\?\)"),
    ([{"random_zoom": {"scale": 2}}], "unknown argument 'scale' \\(choose from height_factor, width_factor"),
    (["random_rotation"], r"'random_rotation': missing argument 'factor': give \{random_rotation: value\}"),
    ([{"random_rotation": 5}], "augmentation 'random_rotation': The `factor` argument should be a number"),
])
def test_bad_arguments_name_the_augmentation(specs, message):
    with pytest.raises(RecipeError, match=message) as raised:
        build_augmentation(specs)
    assert "\n" not in str(raised.value) and raised.value.key == "[0]"


def test_check_augmentation_names_the_recipe_entry():
    check_augmentation(["random_flip", {"random_rotation": 0.1}, {"rand_augment": {"factor": 0.5}}])
    check_augmentation([])
    with pytest.raises(RecipeError, match=r"^\[1\]: augmentation 'random_rotation': The `factor`"):
        check_augmentation(["random_flip", {"random_rotation": 5}])
    with pytest.raises(RecipeError, match=r"^data.augment\[1\]: augmentation 'random_rotation': The `factor`"), \
            RecipeError.under("data.augment"):
        check_augmentation(["random_flip", {"random_rotation": 5}])


def test_nothing_to_build_and_ready_layers():
    import keras

    assert build_augmentation([]) is None and build_augmentation(None) is None
    layer = keras.layers.RandomFlip("vertical")
    pipeline = build_augmentation([layer, "random_grayscale"])
    assert pipeline.layers[0] is layer and type(pipeline.layers[1]).__name__ == "RandomGrayscale"


def _two_images():
    pixels = np.stack([np.zeros((10, 10, 3), np.float32), np.full((10, 10, 3), 100, np.float32)])
    return pixels, np.eye(2, dtype=np.float32)


def test_mixup_blends_images_and_labels_in_the_same_proportion():
    pixels, labels = _two_images()
    mixed, soft = BatchMixer(mixup=1.0, seed=3)(pixels, labels)
    for image, target in zip(mixed, soft):
        assert np.allclose(image, image.flat[0])  # a uniform blend of two uniform images
        np.testing.assert_allclose(image.flat[0] / 100, target[1], atol=1e-5)  # share of image 2 = its label
    np.testing.assert_allclose(soft.sum(axis=1), 1, atol=1e-6)


def test_cutmix_pastes_a_box_and_labels_follow_its_area():
    pixels, labels = _two_images()
    for seed in range(20):
        mixed, soft = BatchMixer(cutmix=1.0, seed=seed)(pixels, labels)
        for image, target, own in zip(mixed, soft, (0, 1)):
            pasted = np.mean(image[..., 0] != pixels[own][..., 0])  # area taken from the other image
            np.testing.assert_allclose(target[1 - own], pasted, atol=1e-6)  # 0 when paired with itself


def test_batch_mixer_needs_an_alpha():
    with pytest.raises(RecipeError, match=r"^mixup / cutmix: expected alphas >= 0, one of them > 0; got 0.0 and 0.0$"):
        BatchMixer()
    with pytest.raises(RecipeError, match=r"^finetune.mixup / cutmix: expected alphas >= 0"), \
            RecipeError.under("finetune"):
        BatchMixer(mixup=-1.0)


# --- any Keras layer by import path ---------------------------------------------------------------

LAYERS_MODULE = '''
import keras


class Brighten(keras.layers.Layer):
    """Adds ``amount`` to every pixel in training; keeps the value_range and seed it was given."""

    def __init__(self, amount, value_range=(0, 1), seed=None, **kwargs):
        super().__init__(**kwargs)
        self.amount, self.value_range, self.seed = amount, value_range, seed

    def call(self, images, training=False):
        return images + self.amount if training else images


def make_brighten(amount=1.0):
    return Brighten(amount)


def make_a_dict():
    return {"not": "a layer"}


FLIP = keras.layers.RandomFlip()
'''


@pytest.fixture
def user_layers(tmp_path, monkeypatch):
    """``augment_test_layers`` (layers, factories, a layer instance) and ``augment_test_broken`` (raises
    on import), importable from ``tmp_path``."""
    (tmp_path / "augment_test_layers.py").write_text(textwrap.dedent(LAYERS_MODULE))
    (tmp_path / "augment_test_broken.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("augment_test_layers", "augment_test_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_layers_by_import_path_in_both_forms(user_layers):
    pipeline = build_augmentation(["keras.layers.RandomFlip", {"keras.layers:RandomRotation": 0.1},
                                   {"augment_test_layers:Brighten": {"amount": 5.0}},
                                   {"augment_test_layers.make_brighten": 2.0}], seed=10)
    flip, rotation, brighten, made = pipeline.layers
    assert (type(flip).__name__, type(rotation).__name__) == ("RandomFlip", "RandomRotation")
    assert rotation.factor == (-0.1, 0.1)
    assert (flip.seed, rotation.seed, brighten.seed) == (10, 11, 12)
    assert tuple(brighten.value_range) == VALUE_RANGE and made.amount == 2.0
    images = np.zeros((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(pipeline.layers[2](images, training=True), images + 5.0)


@pytest.mark.parametrize("spec, message", [
    ({"keras_cv.layers.GridMask": {"ratio_factor": 0.3}},
     r"'keras_cv.layers.GridMask': no module named 'keras_cv': install it \(pip install keras-cv\)"),
    ("keras.layers.RandomFlp", "keras.layers has no 'RandomFlp': did you mean 'RandomFlip'?"),
    ("keras.layers.nosuch:Layer", "no module 'keras.layers.nosuch' in the installed package 'keras': fix the path"),
    ("augment_test_broken:Layer", r"cannot import augment_test_broken \(RuntimeError: half-written module\)"),
    ("collections:OrderedDict", "the class collections.OrderedDict, not a keras.layers.Layer class"),
    ("math.pi", "an object of type float, not a keras.layers.Layer class"),
    ("augment_test_layers:FLIP", "a RandomFlip layer instance, not a keras.layers.Layer class"),
    ("augment_test_layers:make_a_dict", "returned an object of type dict, not a keras.layers.Layer"),
    ({"augment_test_layers:Brighten": {"amount": 1, "ammount": 2}}, r"unknown argument 'ammount' \(did you mean"),
    (".Layer", "give the layer class as package.module:Class"),
])
def test_a_bad_import_path_is_one_line_naming_the_entry(user_layers, monkeypatch, spec, message):
    monkeypatch.setitem(sys.modules, "keras_cv", None)  # not installed, whatever this machine has
    with pytest.raises(RecipeError, match=message) as raised:
        check_augmentation(["random_flip", spec])
    assert raised.value.key == "[1]" and "\n" not in str(raised.value)


@pytest.mark.parametrize("augment, code, fragments", [
    ("[random_flip, keras.layers.RandomFlp]", 2, ["data.augment[1]: augmentation 'keras.layers.RandomFlp'",
                                                  "did you mean 'RandomFlip'?"]),
    ("[{random_resized_crop: {scale: [0.5, 2]}}]", 2, ["data.augment[0]", "scale is a fraction"]),
    ("['keras.layers:RandomFlip', {random_resized_crop: 0.35}]", 0, []),
])
def test_import_paths_and_random_resized_crop_through_transferkit_validate(tmp_path, in_process, augment, code,
                                                                           fragments):
    from test_validate import write

    path = write(tmp_path, f"data: {{train: photos, augment: {augment}}}\nstrategy: finetune\n")
    exit_code, _, error = in_process("validate", path)
    assert exit_code == code and "Traceback" not in error, error
    if code:
        assert len(error.strip().splitlines()) == 1 and all(fragment in error for fragment in fragments), error


# --- random_resized_crop --------------------------------------------------------------------------

def _noise(count=4, size=16):
    return np.random.default_rng(0).uniform(0, 255, (count, size, size, 3)).astype("float32")


def test_random_resized_crop_keeps_the_size_and_draws_new_windows_per_image_call_and_seed():
    images = np.repeat(_noise(1), 4, axis=0)  # four copies of one image
    first = build_augmentation(["random_resized_crop"], seed=0)
    out = np.asarray(first(images, training=True))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out[0], out[1])  # each image its own window
    assert not np.allclose(out, first(images, training=True))  # a new draw per call
    assert not np.allclose(out, build_augmentation(["random_resized_crop"], seed=1)(images, training=True))
    np.testing.assert_allclose(out, build_augmentation(["random_resized_crop"], seed=0)(images, training=True))


def test_random_resized_crop_resizes_a_window_of_the_asked_area_back_to_the_full_size():
    ramp = np.broadcast_to(np.arange(16, dtype="float32")[None, None, :, None], (8, 16, 16, 3))
    out = np.asarray(build_augmentation([{"random_resized_crop": {"scale": [0.25, 0.25], "ratio": 1}}], seed=0)(
        ramp, training=True))
    # a window of half the width, stretched to the full width: one output pixel steps half an input pixel
    np.testing.assert_allclose(np.diff(out[:, :, 1:15, 0], axis=-1), 0.5, atol=1e-4)
    assert len({round(float(row[0]), 3) for row in out[:, 0, :, 0]}) > 1  # windows sit at different places


def test_random_resized_crop_of_the_whole_image_is_the_identity():
    images = _noise()
    whole = build_augmentation([{"random_resized_crop": {"scale": [1, 1], "ratio": [1, 1]}}], seed=0)
    np.testing.assert_allclose(whole(images, training=True), images, atol=1e-3)


def test_random_resized_crop_on_one_image_and_in_a_tf_data_map():
    tf = pytest.importorskip("tensorflow")
    images = _noise()
    pipeline = build_augmentation([{"random_resized_crop": 0.35}], seed=0)
    assert tuple(pipeline.layers[0].scale) == (0.35, 1.0)
    assert np.asarray(pipeline(images[0], training=True)).shape == (16, 16, 3)
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(2).map(lambda batch: pipeline(batch, training=True))
    batches = [batch.numpy() for batch in dataset]
    assert [batch.shape for batch in batches] == [(2, 16, 16, 3)] * 2
    assert not np.allclose(np.concatenate(batches), images)


def test_random_resized_crop_in_a_saved_model_passes_images_through_at_inference(tmp_path):
    import keras

    from transferkit.data.crops import RandomResizedCrop

    images = _noise()
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, RandomResizedCrop(scale=(0.5, 0.9), seed=3)(inputs))
    assert not np.allclose(model(images, training=True), images)
    model.save(tmp_path / "crop.keras")
    loaded = keras.saving.load_model(tmp_path / "crop.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), images)
    assert (loaded.layers[-1].scale, loaded.layers[-1].seed) == ((0.5, 0.9), 3)


@pytest.mark.parametrize("arguments, message", [
    ({"scale": [0.5, 2]}, "scale is a fraction of the image area, at most 1; got"),
    ({"scale": 0}, "scale must be a number > 0 or two of them, low <= high; got 0"),
    ({"ratio": [2, 1]}, "ratio must be a number > 0 or two of them, low <= high; got"),
    ({"interpolation": "cubic"}, "interpolation must be 'bilinear' or 'nearest'"),
])
def test_random_resized_crop_bad_arguments(arguments, message):
    with pytest.raises(RecipeError, match=r"^\[0\]: augmentation 'random_resized_crop': " + message):
        check_augmentation([{"random_resized_crop": arguments}])
