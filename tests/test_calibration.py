"""Calibration: ECE by hand, temperature scaling that finds a known temperature and never makes
things worse, the reliability diagram, and the Keras layer that folds the temperature into a model."""

import numpy as np
import pytest

from transferkit.reports.calibration import (
    apply_temperature, expected_calibration_error, fit_temperature, plot_reliability, reliability_bins,
)


def _sampled(temperature: float, n: int = 3000, classes: int = 5, seed: int = 0):
    """Logits whose true class is drawn from softmax(logits / temperature): the model's own softmax
    is over-confident by exactly ``temperature``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 3.0
    true = np.exp(logits / temperature)
    true /= true.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in true])
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    return labels, probabilities / probabilities.sum(axis=1, keepdims=True)


def test_ece_by_hand():
    # one sample at confidence 0.9 (right), one at 0.8 (wrong): |1 - 0.9| / 2 + |0 - 0.8| / 2
    assert expected_calibration_error([0, 1], [[0.9, 0.1], [0.8, 0.2]]) == pytest.approx(0.45)
    assert [row["n"] for row in reliability_bins([0, 1], [[0.9, 0.1], [0.8, 0.2]])] == [1, 1]
    assert expected_calibration_error([0, 0], [[1.0, 0.0], [1.0, 0.0]]) == pytest.approx(0.0)


def test_temperature_scaling_finds_the_over_confidence_and_lowers_ece():
    labels, probabilities = _sampled(temperature=2.0)
    temperature = fit_temperature(labels, probabilities)
    assert temperature == pytest.approx(2.0, rel=0.15)
    calibrated = apply_temperature(probabilities, temperature)
    assert expected_calibration_error(labels, calibrated) < expected_calibration_error(labels, probabilities) / 2
    np.testing.assert_array_equal(calibrated.argmax(axis=1), probabilities.argmax(axis=1))  # top-1 unchanged
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)


def test_a_calibrated_model_keeps_about_its_temperature_and_an_empty_split_keeps_one():
    labels, probabilities = _sampled(temperature=1.0, seed=1)
    assert fit_temperature(labels, probabilities) == pytest.approx(1.0, abs=0.15)
    assert fit_temperature(np.zeros(0, int), np.zeros((0, 5))) == 1.0
    np.testing.assert_allclose(apply_temperature(probabilities, 1.0), probabilities, atol=1e-9)


def test_the_reliability_diagram_is_a_png(tmp_path):
    labels, probabilities = _sampled(temperature=2.0, n=300)
    path = tmp_path / "val_reliability.png"
    plot_reliability(labels, {"before": probabilities, "after": apply_temperature(probabilities, 2.0)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["val_reliability.png"]  # no temporary file left


def test_the_temperature_layer_matches_numpy_and_loads_in_safe_mode(tmp_path):
    import keras

    from transferkit.models.layers import TemperatureScaling

    _, probabilities = _sampled(temperature=2.0, n=64)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, TemperatureScaling(1.7, name="temperature")(inputs))
    np.testing.assert_allclose(model.predict(probabilities.astype("float32"), verbose=0),
                               apply_temperature(probabilities, 1.7), atol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.get_layer("temperature").temperature == pytest.approx(1.7)
    with pytest.raises(ValueError, match="must be > 0"):
        TemperatureScaling(0.0)
