"""The measured recommender on real images: depth sweep, LogME, ImageNet confidence, recipe and cache."""

import json

import numpy as np
import pytest
import yaml

from transferkit.data.folders import scan_folder
from transferkit.features.measure import Measurement, measure, plot_depth, rank_backbones

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def textures(datasets):
    return scan_folder(datasets / "dtd10", screen=False)


@pytest.fixture(scope="module")
def measured(textures):
    return measure(textures, "mobilenet", alpha=0.25, image_size=96, subsample=90)


def test_measurement_reports_every_signal(measured):
    m = measured
    assert m.layers[-1] == "conv_pw_13_relu" and len(m.layers) == 13
    assert m.images == 200  # at least MIN_PER_CLASS (20) of each of the 10 classes
    assert set(m.probe) == set(m.logme) == set(m.layers)
    assert all(0 <= value <= 1 for value in m.probe.values())
    assert m.best_layer == max(m.layers, key=lambda layer: (m.probe[layer], m.layers.index(layer)))
    assert m.similar == (m.best_layer == m.layers[-1]) == m.signals["depth sweep"]
    assert m.signals["LogME"] == (max(m.logme, key=m.logme.get) == m.layers[-1])
    assert 0 < m.confidence["mean_max_probability"] <= 1 and 0 <= m.confidence["mean_entropy"] <= 1
    assert m.recipe_layer == ("top" if m.similar else m.best_layer)


def test_depth_plot_is_written(measured, tmp_path):
    plot_depth(Measurement(**measured.to_dict()), tmp_path / "depth.png")
    assert (tmp_path / "depth.png").read_bytes()[:4] == b"\x89PNG"


def test_backbone_ranking_skips_backbones_without_weights(textures):
    rows = rank_backbones(textures, [("efficientnet_b0", None), ("mobilenet", 0.25)], subsample=60)
    ranked, skipped = rows[0], rows[1]
    assert ranked["backbone"] == "mobilenet" and ranked["rank_logme"] == ranked["rank_probe"] == 1
    assert np.isfinite(ranked["logme"]) and ranked["seconds"] > 0
    assert skipped["backbone"] == "efficientnet_b0" and "not cached" in skipped["skipped"]


def test_given_answers_override_the_measurement(monkeypatch, datasets):
    from transferkit.features import measure as measure_module
    from transferkit.recommend import recommend

    monkeypatch.setattr(measure_module, "measure", lambda *a, **k: pytest.fail("measured although told"))
    rec = recommend(similar="no", data=datasets / "dtd10")
    assert rec.strategy == "extract" and rec.measurement is None and rec.evidence["median_per_class"] == 50


def test_recommend_command_measures_writes_and_caches(small_cats_dogs, home, tmp_path):
    from test_cli import transferkit

    recipe = tmp_path / "pets.yaml"
    result = transferkit("recommend", "--data", small_cats_dogs, "--backbone", "mobilenet", "--alpha", "0.25",
                         "--write", recipe, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["measurement"]["images"] == 40 and answer["strategy"] == "extract"
    assert answer["evidence"]["depth_sweep"].startswith("best ")
    written = yaml.safe_load(recipe.read_text())
    assert written["extract"]["layer"] == answer["measurement"]["best_layer"] or written["extract"]["layer"] == "top"
    assert written["backbone"] == {"name": "mobilenet", "weights": "imagenet", "alpha": 0.25}
    assert (tmp_path / "pets.depth.png").is_file()

    extracted = transferkit("extract", recipe, "--set", f"output={tmp_path / 'run'}")
    assert extracted.returncode == 0, extracted.stderr
    assert "extracting" not in extracted.stderr  # every feature came from the store the recommender filled
