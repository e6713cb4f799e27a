"""FeatureExtractor as a scikit-learn transformer, on real cats/dogs images and MobileNet alpha 0.25 weights."""

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from transferkit.models.backbones import create_backbone
from transferkit.data.decode import load_images
from transferkit.errors import BackboneError
from transferkit.models.surgery import cut
from transferkit.features.transformer import FeatureExtractor, clear_model_cache

SETTINGS = {"backbone": "mobilenet", "alpha": 0.25, "image_size": 96}


@pytest.fixture(scope="module")
def images(datasets):
    """12 cats then 12 dogs: (paths, labels)."""
    paths = [str(p) for cls in ("cat", "dog") for p in sorted((datasets / "cats_dogs" / cls).iterdir())[:12]]
    return paths, np.repeat([0, 1], 12)


@pytest.fixture(scope="module")
def fitted(images):
    return FeatureExtractor(**SETTINGS).fit(images[0])


def test_params_round_trip_through_clone_and_set_params():
    extractor = FeatureExtractor(layer=["conv_pw_5_relu", "top"], tta=True, **SETTINGS)
    copy = clone(extractor)
    assert copy.get_params() == extractor.get_params() and copy is not extractor
    assert copy.set_params(layer="top", batch_size=8).get_params()["layer"] == "top"
    assert extractor.layer == ["conv_pw_5_relu", "top"]  # stored as given


def test_refits_with_the_same_settings_share_one_model(fitted):
    assert clone(fitted).fit(None).model_ is fitted.model_
    assert FeatureExtractor(**{**SETTINGS, "image_size": 128}).fit(None).model_ is not fitted.model_


def test_transform_paths_equals_the_cut_backbone(fitted, images):
    paths = images[0][:8] + images[0][12:20]
    features = fitted.transform(paths)
    body = create_backbone("mobilenet", alpha=0.25, image_size=96)
    expected = cut(body, "top").predict(load_images(paths, 96).astype("float32"), verbose=0)
    assert features.dtype == np.float32 and features.shape == (16, 256) == (16, fitted.n_features_out_)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    assert fitted.layers_ == {"conv_pw_13_relu": 256}
    assert fitted.get_feature_names_out()[[0, -1]].tolist() == ["conv_pw_13_relu_avg0", "conv_pw_13_relu_avg255"]


def test_pixel_arrays_give_the_features_of_their_files(fitted, images):
    paths = images[0][:4]
    from_paths = fitted.transform(paths)
    pixels = load_images(paths, 96)
    np.testing.assert_allclose(fitted.transform(pixels), from_paths, atol=1e-5)
    np.testing.assert_allclose(fitted.transform(pixels.astype("float32")), from_paths, atol=1e-5)
    larger = load_images(paths, 160)  # resized to 96 px: close to decoding at 96 px directly
    assert np.corrcoef(fitted.transform(larger).ravel(), from_paths.ravel())[0, 1] > 0.95


def test_tta_averages_each_image_and_its_mirror_image(fitted, images):
    tta = FeatureExtractor(tta=True, **SETTINGS).fit(None)
    assert tta.model_ is fitted.model_  # the flip is added at transform time, on the shared model
    pixels = load_images(images[0][:4], 96).astype("float32")
    mirrored = pixels[:, :, ::-1]
    expected = (fitted.transform(pixels) + fitted.transform(mirrored)) / 2
    np.testing.assert_allclose(tta.transform(pixels), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tta.transform(mirrored), tta.transform(pixels), rtol=1e-5, atol=1e-5)


def test_power_norm_is_the_signed_square_root_and_feature_model_runs_what_transform_does(fitted, images):
    both = FeatureExtractor(tta=True, power_norm=True, **SETTINGS).fit(None)
    assert both.model_ is fitted.model_ and both.feature_model() is both.feature_model()  # built once
    pixels = load_images(images[0][:4], 96).astype("float32")
    averaged = (fitted.transform(pixels) + fitted.transform(pixels[:, :, ::-1])) / 2
    np.testing.assert_allclose(both.transform(pixels), np.sign(averaged) * np.sqrt(np.abs(averaged)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both.feature_model().predict(pixels, verbose=0), both.transform(pixels), atol=1e-6)


def test_grid_search_over_c_and_layer_then_joblib_round_trip(images, tmp_path):
    paths, labels = images
    pipe = make_pipeline(FeatureExtractor(**SETTINGS), LogisticRegression(max_iter=1000))
    search = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0],
                                 "featureextractor__layer": ["conv_pw_11_relu", "top"]}, cv=2)
    search.fit(paths, labels)
    assert search.predict(paths).tolist() == labels.tolist()  # ImageNet features separate the training images
    joblib.dump(search.best_estimator_, tmp_path / "pipe.joblib")
    loaded = joblib.load(tmp_path / "pipe.joblib")
    assert "model_" not in vars(loaded.steps[0][1])  # rebuilt on first use
    clear_model_cache()
    np.testing.assert_allclose(loaded.predict_proba(paths[::3]), search.predict_proba(paths[::3]), atol=1e-6)


def test_random_weights_survive_pickling(images, tmp_path):
    extractor = FeatureExtractor(weights=None, **SETTINGS).fit(None)
    joblib.dump(extractor, tmp_path / "random.joblib")
    np.testing.assert_allclose(joblib.load(tmp_path / "random.joblib").transform(images[0][:2]),
                               extractor.transform(images[0][:2]), atol=1e-6)


def test_errors(images):
    with pytest.raises(NotFittedError):
        FeatureExtractor(**SETTINGS).transform(images[0][:1])
    with pytest.raises(BackboneError, match=r"^unknown backbone 'mobilenet_v9': did you mean mobilenet_v2\?[^\n]*$"):
        FeatureExtractor("mobilenet_v9").fit(None)
    with pytest.raises(BackboneError, match="has no layer 'conv_pw_99_relu'"):
        FeatureExtractor(layer="conv_pw_99_relu", **SETTINGS).fit(None)
    with pytest.raises(ValueError, match="pooling must be one of avg, max, got 'mean'"):
        FeatureExtractor(pooling="mean", **SETTINGS).fit(None)
    fitted = FeatureExtractor(**SETTINGS).fit(None)
    with pytest.raises(ValueError, match="wrap it in a list"):
        fitted.transform(images[0][0])
    with pytest.raises(ValueError, match=r"\[N, height, width, 3\]"):
        fitted.transform(np.zeros((2, 96, 96), np.uint8))
