"""transferkit.data.augment: recipe specs to Keras augmentation layers."""

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
])
def test_parse_augment_spec_forms(spec, expected):
    assert parse_augment_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("random_flp", "unknown augmentation 'random_flp': did you mean 'random_flip'?"),
    ({"randaugment": {}}, "did you mean 'rand_augment'?"),
    ("mix_up", "unknown augmentation 'mix_up'"),
    ({"random_flip": "horizontal", "random_zoom": 0.1}, r"expected a name or \{name: arguments\}"),
    (["random_flip"], "expected a name"),
    ({"auto_contrast": 1}, "'auto_contrast' takes no main argument"),
])
def test_parse_augment_spec_errors(spec, message):
    with pytest.raises(RecipeError, match=message) as raised:
        parse_augment_spec(spec)
    assert isinstance(raised.value, TransferkitError) and "\n" not in str(raised.value)


def test_table_names_real_keras_layers_and_covers_the_usual_ones():
    import keras

    usual = ("random_flip random_rotation random_zoom random_translation random_contrast random_brightness "
             "random_crop random_grayscale random_hue random_saturation random_color_jitter random_sharpness "
             "random_shear random_erasing random_gaussian_blur random_perspective rand_augment aug_mix "
             "solarization auto_contrast equalization").split()
    assert set(usual) <= set(AUGMENTATIONS)
    assert all(issubclass(getattr(keras.layers, cls), keras.layers.Layer) for cls in AUGMENTATIONS.values())


def test_every_augmentation_runs_on_raw_pixels():
    pipeline = build_augmentation([SPECS.get(name, name) for name in AUGMENTATIONS], seed=0)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    out = np.asarray(pipeline(images, training=True))
    assert out.shape == (4, 24, 24, 3) and np.isfinite(out).all()
    assert out.max() > 1.5  # still 0..255 pixels, not squashed to 0..1
    assert [type(layer).__name__ for layer in pipeline.layers] == list(AUGMENTATIONS.values())


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
