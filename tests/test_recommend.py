import pytest

from transferkit.backbones import get_backbone_info
from transferkit.errors import TransferkitError
from transferkit.recipe import load_recipe
from transferkit.recommend import LARGE_IMAGES_PER_CLASS, recommend


@pytest.mark.parametrize("size, similar, strategy", [
    ("small", True, "extract"), ("small", False, "extract"),
    ("large", True, "finetune"), ("large", False, "finetune"),
])
def test_each_cell_of_the_table(size, similar, strategy):
    rec = recommend(size=size, similar=similar)
    assert (rec.size, rec.similar, rec.strategy) == (size, similar, strategy)
    assert rec.summary and len(rec.rationale) >= 2


def test_small_similar_extracts_from_the_top():
    assert recommend(size="small", similar="yes").settings["extract"]["layer"] == "top"


def test_small_different_extracts_from_an_earlier_layer():
    info = get_backbone_info("mobilenet_v2")
    layer = recommend(size="small", similar="no").settings["extract"]["layer"]
    assert layer == info.mid_cut and layer in info.cut_points[:-1]


def test_large_similar_warms_up_then_unfreezes_the_top_blocks():
    settings = recommend(size="large", similar=True, backbone="resnet50").settings
    assert settings["warmup"]["epochs"] > 0
    assert settings["finetune"]["unfreeze"]["from"] == get_backbone_info("resnet50").finetune_from
    assert settings["finetune"]["optimizer"]["learning_rate"] < settings["warmup"]["optimizer"]["learning_rate"] * 10


def test_large_different_unfreezes_everything():
    assert recommend(size="large", similar=False).settings["finetune"]["unfreeze"]["all"] is True


def test_size_as_images_per_class_uses_the_documented_threshold():
    assert recommend(size=LARGE_IMAGES_PER_CLASS - 1, similar=True).size == "small"
    assert recommend(size=LARGE_IMAGES_PER_CLASS, similar=True).size == "large"
    assert recommend(size="5000", similar=True).evidence["images_per_class"] == 5000


def test_size_counted_from_data(datasets):
    rec = recommend(data=datasets / "dtd10", similar=False)
    assert rec.size == "small"
    assert rec.evidence["classes"] == 10 and rec.evidence["images"] == 500
    assert rec.evidence["median_per_class"] == 50


@pytest.mark.parametrize("kwargs, message", [
    ({"size": "medium", "similar": True}, "expected small, large"),
    ({"size": 0, "similar": True}, ">= 1"),
    ({"size": "small", "similar": "maybe"}, "expected yes or no"),
    ({"size": "small"}, "--similar yes|no"),
    ({"similar": True}, "--size small|large"),
])
def test_bad_answers_say_what_is_expected(kwargs, message):
    with pytest.raises(TransferkitError, match=message.replace("|", r"\|")):
        recommend(**kwargs)


@pytest.mark.parametrize("size, similar", [("small", True), ("small", False), ("large", True), ("large", False)])
def test_every_recommended_recipe_validates(size, similar, datasets):
    rec = recommend(size=size, similar=similar)
    recipe = load_recipe(rec.recipe(data=str(datasets / "flowers5")))
    assert recipe.strategy == rec.strategy
    assert recipe.data.train == str(datasets / "flowers5")
