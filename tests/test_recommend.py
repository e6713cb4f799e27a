import pytest

from transferkit.models.registry import get_backbone_info
from transferkit.errors import RecipeError, TransferkitError
from transferkit.recipe import load_recipe
from transferkit.recommend import (LARGE_IMAGES_PER_CLASS, format_recommendation, recipe_data_path, recommend,
                                   write_recipe)
from transferkit.strategies import check_recipe


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


def test_large_similar_starts_the_head_from_a_linear_probe_then_unfreezes_the_top_blocks():
    settings = recommend(size="large", similar=True, backbone="resnet50").settings
    assert settings["warmup"]["linear_probe"] is True
    assert settings["finetune"]["unfreeze"]["from"] == get_backbone_info("resnet50").finetune_from
    assert settings["finetune"]["optimizer"]["learning_rate"] <= 1e-3


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
    assert not any("balanced" in line for line in rec.rationale)  # 50 images in each class


def test_imbalanced_data_gets_told_how_to_balance_it(datasets):
    rec = recommend(data=datasets / "pneumonia28", similar=False)  # 1582 normal, 4256 pneumonia
    assert rec.evidence["imbalance"] >= 2
    assert "data.class_weight: balanced" in rec.rationale[-1] and "x the images of the smallest" in rec.rationale[-1]


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


@pytest.mark.parametrize("backbone, alpha", [("mobilenet_v2", None), ("mobilenet", 0.25)])
@pytest.mark.parametrize("size, similar", [("small", True), ("small", False), ("large", True), ("large", False)])
def test_every_recommended_recipe_validates(size, similar, backbone, alpha, datasets):
    rec = recommend(size=size, similar=similar, backbone=backbone, alpha=alpha)
    recipe = load_recipe(rec.recipe(data=str(datasets / "flowers5")))
    assert recipe.strategy == rec.strategy and recipe.backbone.name == backbone and recipe.backbone.alpha == alpha
    assert recipe.data.train == str(datasets / "flowers5")
    check_recipe(recipe)  # layer names, optimizers, weights: what validate checks


def test_settings_name_the_chosen_backbones_own_layers():
    info = get_backbone_info("mobilenet")
    assert recommend(size="large", similar=True, backbone="mobilenet").settings["finetune"]["unfreeze"]["from"] == \
        info.finetune_from == "conv_dw_12"
    assert recommend(size="small", similar=False, backbone="mobilenet").settings["extract"]["layer"] == info.mid_cut
    with pytest.raises(TransferkitError, match="names layers of mobilenet_v2 .*backbone='mobilenet'"):
        recommend(size="large", similar=True).recipe(backbone="mobilenet")


def test_the_written_recipe_carries_the_rationale_and_marks_the_placeholder(tmp_path):
    rec = recommend(size="small", similar=True)
    path = tmp_path / "recipe.yaml"
    write_recipe(path, rec.recipe(), rec, placeholder=True)
    text = path.read_text()
    assert text.startswith(f"# transferkit recipe: {rec.summary}\n# - {rec.rationale[0]}\n")
    assert "  train: path/to/images  # FILL IN: one sub-folder per class\n" in text
    assert load_recipe(path).extract.layer == "top"


def test_the_report_and_the_data_path_a_recipe_holds(tmp_path):
    rec = recommend(size="small", similar=True)
    lines = format_recommendation(rec).splitlines()
    assert lines[0] == f"small dataset, similar to ImageNet -> extract: {rec.summary}"
    assert lines[lines.index("why:") + 1] == f"  - {rec.rationale[0]}" and "settings:" in lines
    assert recipe_data_path(None) is None
    assert recipe_data_path("builtin:digits") == "builtin:digits"  # runs as written, not a placeholder
    assert recipe_data_path(str(tmp_path / "a" / ".." / "b")) == str((tmp_path / "b").resolve())


def test_recommend_by_search_refuses_what_cannot_work_before_measuring(datasets):
    import transferkit as tk

    with pytest.raises(RecipeError, match="budget: expected a duration"):
        tk.recommend_by_search(str(datasets / "cats_dogs"), "soon")
    with pytest.raises(TransferkitError, match="resume or restart, not both"):
        tk.recommend_by_search(str(datasets / "cats_dogs"), "1m", resume=True, restart=True)
    with pytest.raises(RecipeError, match="data.test"):
        tk.recommend_by_search(str(datasets / "cats_dogs"), "1m", overrides=["data.test=2"])
