"""Heads, attaching them, freezing and unfreezing, on real ImageNet weights (MobileNetV2 alpha 0.35, 96 px)."""

import keras
import numpy as np
import pytest

from transferkit.models.backbones import create_backbone
from transferkit.models.registry import get_backbone_info
from transferkit.errors import BackboneError, RecipeError
from transferkit.models.heads import attach_head, build_head, check_head, head_layers, resolve_head
from transferkit.recipe import UnfreezeSpec
from transferkit.models.surgery import body_layers, count_parameters, freeze, set_trainable, unfreeze

SIZE = 96
CLASSES = 3


@pytest.fixture
def body():
    """A fresh backbone per test: classifiers share the body's layers, so training would leak."""
    return create_backbone("mobilenet_v2", alpha=0.35, image_size=SIZE)


def images(n=8, seed=0):
    """Random raw pixels (0..255) and labels over CLASSES classes."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"), np.arange(n) % CLASSES


def train_two_steps(model):
    """SGD on 8 random images in batches of 4; (re)compiles, so trainable changes take effect."""
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    x, y = images()
    return model.fit(x, y, batch_size=4, epochs=1, verbose=0)


def snapshot(layers):
    return {layer.name: [keras.ops.convert_to_numpy(w).copy() for w in layer.weights] for layer in layers}


def changed(before, after):
    """Names of the layers whose weights (trainable or not) differ in any bit."""
    return {name for name in before if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}


def names(layers):
    return [layer.name for layer in layers]


# --- attaching heads ---------------------------------------------------------------------------

def test_attached_head_outputs_probabilities_from_a_flat_model(body):
    model = attach_head(body, CLASSES)
    probabilities = model.predict(images(4)[0], verbose=0)
    assert probabilities.shape == (4, CLASSES) and probabilities.min() >= 0
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.name == "mobilenet_v2_classifier" and model.output.dtype == "float32"
    assert names(head_layers(model)) == ["head_pool", "head_logits", "probabilities"]
    # The backbone's own layers, not a nested sub-model: freezing by name works on the classifier.
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert model.get_layer("block_13_expand") is body.get_layer("block_13_expand")
    assert names(body_layers(model)) == names(body.layers)
    assert model.losses == []  # no l1/l2: no penalty terms


def test_head_keywords_build_its_layers_and_penalties(body):
    model = attach_head(body, CLASSES, layers=[{"dense": 32, "activation": "gelu", "dropout": 0.5, "batch_norm": True},
                                               {"dense": 16}], dropout=0.25, l2=1e-3)
    assert names(head_layers(model)) == ["head_pool", "head_dense_1", "head_batch_norm_1", "head_dropout_1",
                                         "head_dense_2", "head_dropout", "head_logits", "probabilities"]
    first = model.get_layer("head_dense_1")
    assert first.units == 32 and first.activation is keras.activations.gelu
    assert model.get_layer("head_dropout_1").rate == 0.5 and model.get_layer("head_dropout").rate == 0.25
    penalties = [float(keras.ops.convert_to_numpy(loss)) for loss in model.losses]
    assert len(penalties) == 3 and min(penalties) > 0  # one per Dense kernel


@pytest.mark.parametrize("pooling, kind, width", [("avg", keras.layers.GlobalAveragePooling2D, 1280),
                                                  ("max", keras.layers.GlobalMaxPooling2D, 1280),
                                                  ("flatten", keras.layers.Flatten, 3 * 3 * 1280)])
def test_pooling_feeds_the_head(body, pooling, kind, width):
    model = attach_head(body, CLASSES, pooling=pooling)
    assert isinstance(model.get_layer("head_pool"), kind)
    assert model.get_layer("head_logits").kernel.shape == (width, CLASSES)  # out_relu is 3 x 3 x 1280
    assert model.predict(images(2)[0], verbose=0).shape == (2, CLASSES)


def test_head_attaches_at_a_named_layer(body):
    model = attach_head(body, CLASSES, layer="block_12_add")
    assert names(body_layers(model))[-1] == "block_12_add" and "block_13_expand" not in names(model.layers)
    channels = body.get_layer("block_12_add").output.shape[-1]
    assert model.get_layer("head_logits").kernel.shape == (channels, CLASSES)
    with pytest.raises(BackboneError, match="did you mean block_12_add"):
        attach_head(body, CLASSES, layer="block_12_ad")


def test_probabilities_stay_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = attach_head(create_backbone("mobilenet_v2", alpha=0.35, image_size=SIZE), CLASSES)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.get_layer("head_logits").compute_dtype == "float16"
    assert model.output.dtype == "float32"


# --- custom heads ------------------------------------------------------------------------------

def small_head(features, num_classes):
    x = keras.layers.Dense(8, activation="relu", name="mine")(features)
    return keras.layers.Dense(num_classes, activation="softmax", name="my_probabilities")(x)


HEAD_MODULE = '''
import keras

NOT_A_FUNCTION = 3

def tiny_head(features, num_classes):
    return keras.layers.Dense(num_classes, activation="softmax", name="tiny")(features)
'''


@pytest.fixture
def head_module(tmp_path, monkeypatch):
    (tmp_path / "my_heads.py").write_text(HEAD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_heads"


def test_custom_head_function_trains(body):
    model = attach_head(body, CLASSES, custom=small_head)
    # Head layers are found by position, whatever the custom head calls them.
    assert names(head_layers(model)) == ["head_pool", "mine", "my_probabilities", "probabilities"]
    assert model.output.shape == (None, CLASSES)
    freeze(body_layers(model))  # warm-up, and a faster test
    assert np.isfinite(train_two_steps(model).history["loss"][0])


def test_custom_head_from_an_import_path_trains(body, head_module):
    function = resolve_head(f"{head_module}:tiny_head")
    assert function.__name__ == "tiny_head" and resolve_head(f"{head_module}.tiny_head") is function
    assert resolve_head(small_head) is small_head and resolve_head(None) is None
    model = attach_head(body, CLASSES, custom=f"{head_module}:tiny_head")
    assert names(head_layers(model)) == ["head_pool", "tiny", "probabilities"]
    freeze(body_layers(model))
    assert np.isfinite(train_two_steps(model).history["loss"][0])


@pytest.mark.parametrize("path, message", [
    ("nowhere.heads:head", r"head.custom: cannot import 'nowhere.heads:head' \(ModuleNotFoundError: "
                           r"No module named 'nowhere'\): give package.module:name of a function head\("),
    ("my_heads:missing", r"cannot import 'my_heads:missing' \(AttributeError: .*missing"),
    ("my_heads:NOT_A_FUNCTION", r"head.custom: 'my_heads:NOT_A_FUNCTION' is a int, not a function"),
])
def test_bad_import_path_is_a_recipe_error(head_module, path, message):
    with pytest.raises(RecipeError, match=message), RecipeError.under("head"):
        resolve_head(path)


def test_custom_head_with_the_wrong_output_is_refused():
    def four_class_head(features, num_classes):
        return small_head(features, 4)

    with pytest.raises(RecipeError, match=r"^custom: four_class_head returned shape \(None, 4\), "
                                          r"expected .* \(batch, 3\)"):
        build_head(keras.Input((16,)), CLASSES, custom=four_class_head)


def test_a_head_that_does_not_take_features_and_num_classes_is_refused_before_it_is_called(head_module):
    def no_classes(features):
        raise AssertionError("never called")

    with pytest.raises(RecipeError, match=r"^head.custom: .*no_classes takes \(features\), not 2 positional "
                                          r"arguments: expected a function head\(features, num_classes\)"), \
            RecipeError.under("head"):
        build_head(keras.Input((16,)), CLASSES, custom=no_classes)
    with pytest.raises(RecipeError, match=r"^imag.head.custom: 'my_heads:NOT_A_FUNCTION' is a int"), \
            RecipeError.under("imag.head"):
        resolve_head(f"{head_module}:NOT_A_FUNCTION")


def test_check_head_finds_what_building_would():
    check_head(layers=[{"dense": 8, "activation": "gelu"}], custom=None)
    check_head(custom=small_head)
    with pytest.raises(RecipeError, match=r"^imag.head.layers\[0\].activation: unknown activation 'rleu'"), \
            RecipeError.under("imag.head"):
        check_head(layers=[{"dense": 8, "activation": "rleu"}])
    with pytest.raises(RecipeError, match=r"^layers\[1\]: unknown key 'activaton': give \{dense: units\} and any "
                                          r"of activation, dropout, batch_norm$"):
        check_head(layers=[{"dense": 8}, {"dense": 8, "activaton": "gelu"}])
    with pytest.raises(RecipeError, match=r"^layers\[0\]: missing key 'dense'"):
        check_head(layers=[{"activation": "gelu"}])


def test_unknown_activation_names_the_key():
    with pytest.raises(RecipeError, match=r"^layers\[1\].activation: unknown activation 'rleu'"):
        build_head(keras.Input((16,)), CLASSES, layers=[{"dense": 8}, {"dense": 8, "activation": "rleu"}])
    with pytest.raises(RecipeError, match=r"^head.layers\[1\].activation: unknown activation 'rleu'"), \
            RecipeError.under("head"):
        build_head(keras.Input((16,)), CLASSES, layers=[{"dense": 8}, {"dense": 8, "activation": "rleu"}])


# --- freezing and unfreezing -------------------------------------------------------------------

def test_warmup_trains_the_head_and_leaves_the_body_bit_identical(body):
    model = attach_head(body, CLASSES, layers=[{"dense": 8, "batch_norm": True}])
    freeze(body_layers(model))
    before = snapshot(model.layers)
    train_two_steps(model)
    # Body: kernels and BatchNorm moving statistics untouched. Head: everything moved.
    assert changed(before, snapshot(model.layers)) == {"head_dense_1", "head_batch_norm_1", "head_logits"}


def test_unfreeze_from_a_layer_trains_only_the_layers_above_it(body):
    model = attach_head(body, CLASSES)
    trained = unfreeze(model, from_layer="block_13_expand")
    body_names = names(body_layers(model))
    above = body_names[body_names.index("block_13_expand"):]
    assert trained[0] == "block_13_expand" and set(trained) <= set(above)
    assert "block_13_expand_BN" not in trained and "block_12_expand" not in trained
    before = snapshot(body_layers(model))
    train_two_steps(model)
    # Exactly the unfrozen layers changed: nothing below the cut, no BatchNorm statistics anywhere.
    assert changed(before, snapshot(body_layers(model))) == set(trained)
    # Frozen BatchNorm runs in inference mode even when the model is called in training mode.
    x = images(4)[0]
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-7)


def test_train_batchnorm_updates_statistics_above_the_cut_only(body):
    model = attach_head(body, CLASSES)
    trained = unfreeze(model, from_layer="block_13_expand", train_batchnorm=True)
    assert "block_13_expand_BN" in trained and "Conv_1_bn" in trained
    before = snapshot(body_layers(model))
    train_two_steps(model)
    moved = changed(before, snapshot(body_layers(model)))
    assert moved == set(trained) and "block_12_expand_BN" not in moved
    x = images(4)[0]
    assert not np.allclose(model(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-7)


def test_unfreeze_modes_pick_the_documented_layers(body):
    model = attach_head(body, CLASSES, layers=[{"dense": 8}])
    body_names = names(body_layers(model))
    with_weights = [layer.name for layer in body_layers(model) if layer.weights]
    everything = unfreeze(model, everything=True)
    assert everything[0] == "Conv1" and everything[-1] == "Conv_1"
    assert everything == [name for name in with_weights
                          if not isinstance(model.get_layer(name), keras.layers.BatchNormalization)]
    assert all(layer.trainable for layer in head_layers(model))
    assert not any(layer.trainable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
                   and layer.name in body_names)
    # The backbone's default, finetune_from, when no mode is given.
    assert unfreeze(model)[0] == get_backbone_info("mobilenet_v2").finetune_from
    # Blocks end at cut points; the final 1x1 conv stage after block_16 is the top block.
    assert unfreeze(model, top_blocks=1) == ["Conv_1"]
    assert unfreeze(model, top_blocks=1, train_batchnorm=True) == ["Conv_1", "Conv_1_bn"]
    assert unfreeze(model, top_blocks=2) == ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"]
    assert unfreeze(model, top_blocks=17) == everything  # 16 blocks + the top: the stem too
    # fraction: the last ceil(f * n) of the n body layers with weights (n = 104 here: 11 for 0.1).
    assert len(with_weights) == 104
    tenth = unfreeze(model, fraction=0.1, train_batchnorm=True)
    assert tenth == with_weights[-11:] and tenth[0] == "block_15_depthwise_BN"
    assert unfreeze(model, fraction=1.0) == everything


def test_unfreeze_errors_name_the_key_and_the_fix(body):
    model = attach_head(body, CLASSES)
    with pytest.raises(RecipeError, match="finetune.unfreeze: give one of from, top_blocks, fraction, all; "
                                          "got from, top_blocks"):
        UnfreezeSpec(from_layer="block_13_expand", top_blocks=2).mode()  # a recipe's choices: checked at load
    with pytest.raises(RecipeError, match="^give one of from_layer, top_blocks, fraction, everything; "
                                          "got from_layer, top_blocks$"):
        unfreeze(model, from_layer="block_13_expand", top_blocks=2)
    with pytest.raises(BackboneError, match="no layer 'block_13_expnd': did you mean block_13_expand"):
        unfreeze(model, from_layer="block_13_expnd")
    with pytest.raises(RecipeError, match="^finetune.unfreeze.top_blocks: 18 is out of range: .* 17 blocks; "
                                          "give 1 to 17"), RecipeError.under("finetune.unfreeze"):
        unfreeze(model, top_blocks=18)
    with pytest.raises(RecipeError, match=r"^fraction: expected a number > 0 and <= 1, got 0"):
        unfreeze(model, fraction=0)
    with pytest.raises(RecipeError, match="^finetune.unfreeze.from: 'head_logits' is a head layer"), \
            RecipeError.under("finetune.unfreeze"):
        unfreeze(model, from_layer="head_logits")
    with pytest.raises(BackboneError, match="did you mean head_logits"):
        set_trainable(model, {"head_logitz"})
    mid = attach_head(body, CLASSES, layer="block_12_add")
    with pytest.raises(RecipeError, match="default block_13_expand is not in the body cut at block_12_add"):
        unfreeze(mid, info=get_backbone_info("mobilenet_v2"))


def test_count_parameters_grows_as_the_body_unfreezes(body):
    model = attach_head(body, CLASSES)
    freeze(body_layers(model))
    frozen = count_parameters(model)
    assert frozen["trainable"] == 1280 * CLASSES + CLASSES  # the logits layer alone
    assert frozen["trainable"] + frozen["non_trainable"] == frozen["total"] == model.count_params()
    unfreeze(model, top_blocks=1)
    top = count_parameters(model)
    unfreeze(model, everything=True)
    everything = count_parameters(model)
    assert frozen["trainable"] < top["trainable"] < everything["trainable"]
    assert top["total"] == everything["total"] == frozen["total"]
    # Frozen BatchNorm: its moving statistics and gamma/beta stay non-trainable even with all: true.
    bn = sum(int(np.prod(w.shape)) for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
             for w in layer.weights)
    assert everything["non_trainable"] == bn
