"""What a run folder's ``model/`` holds: a :class:`Predictor`, raw images -> class probabilities.

* :class:`KerasPredictor`: one Keras model (the fine-tuning strategies): ``model/model.keras``.
* :class:`FeaturePredictor`: a feature model and the scikit-learn classifier fitted on its features (extract).

Both load without running code: Keras models in safe mode, the classifier as arrays or trusted
``skops`` types (see :mod:`transferkit.features.persistence`). Both may carry a calibration
temperature (:meth:`Predictor.with_temperature`): folded into the Keras model as a layer, or kept
beside the classifier in ``model/calibration.json`` and folded into its weights on export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.io import atomic_path, atomic_write_json


class Predictor(Protocol):
    """Raw images -> class probabilities, kept in a run folder's ``model/``: what a :class:`Run` holds,
    whatever the strategy (:class:`KerasPredictor` or :class:`FeaturePredictor`)."""

    def predict(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """float64 ``[N, classes]`` for float32 pixels ``[N, S, S, 3]`` in 0..255."""

    def save(self, folder: Path) -> None:
        """Write its files into ``model/`` of the run folder ``folder``, each atomically."""

    def keras_model(self, classifier_name: str) -> tuple[Any, list[int]]:
        """One Keras model, raw images -> probabilities, and the class index of each of its outputs."""

    def with_temperature(self, temperature: float) -> "Predictor":
        """The same predictor giving ``softmax(log p / temperature)`` (see :mod:`transferkit.reports.calibration`)."""

    @classmethod
    def load(cls, folder: Path, trusted: Iterable[str] = ()) -> "Predictor":
        """What :meth:`save` wrote into the run folder ``folder``; nothing in it is run as code."""


@dataclass
class KerasPredictor:
    """A Keras model, raw images -> class probabilities (the fine-tuning strategies): ``model/model.keras``."""
    model: Any

    def predict(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        from transferkit.features.transformer import predict_in_batches

        return predict_in_batches(self.model, pixels, batch_size).astype("float64")

    def save(self, folder: Path) -> None:
        with atomic_path(folder / "model" / "model.keras") as tmp:
            self.keras_model()[0].save(tmp)

    def keras_model(self, classifier_name: str = "") -> tuple[Any, list[int]]:
        """An uncompiled twin of the model, sharing its layers: its file holds no optimizer state."""
        import keras

        twin = keras.Model(self.model.input, self.model.output, name=self.model.name)
        return twin, list(range(int(self.model.output.shape[-1])))

    def with_temperature(self, temperature: float) -> "KerasPredictor":
        """The model with a :class:`~transferkit.models.layers.TemperatureScaling` layer on its output."""
        import keras

        from transferkit.models.layers import TemperatureScaling

        scaled = TemperatureScaling(temperature, name="temperature")(self.model.output)
        return KerasPredictor(keras.Model(self.model.input, scaled, name=self.model.name))

    @classmethod
    def load(cls, folder: Path, trusted: Iterable[str] = ()) -> "KerasPredictor":
        return cls(_load_keras_model(folder / "model" / "model.keras", compile=False))


@dataclass
class FeaturePredictor:
    """A Keras model, raw images -> features, and the scikit-learn classifier fitted on them (the extract
    strategy): ``model/feature_extractor.keras``, ``model/classifier.npz`` or ``.skops``, and the calibration
    temperature in ``model/calibration.json``."""
    feature_extractor: Any
    classifier: Any
    temperature: float = 1.0

    def predict(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        from transferkit.features.classifiers import predict_proba
        from transferkit.features.transformer import predict_in_batches
        from transferkit.reports.calibration import apply_temperature

        probabilities = predict_proba(self.classifier, predict_in_batches(self.feature_extractor, pixels, batch_size))
        return probabilities if self.temperature == 1.0 else apply_temperature(probabilities, self.temperature)

    def with_temperature(self, temperature: float) -> "FeaturePredictor":
        return FeaturePredictor(self.feature_extractor, self.classifier, float(temperature))

    def save(self, folder: Path) -> None:
        """Raises TransferkitError: the classifier cannot be saved without pickle."""
        from transferkit.features.persistence import save_classifier

        with atomic_path(folder / "model" / "feature_extractor.keras") as tmp:
            self.feature_extractor.save(tmp)
        save_classifier(self.classifier, folder / "model" / "classifier")
        atomic_write_json(folder / "model" / "calibration.json", {"temperature": self.temperature})

    def keras_model(self, classifier_name: str = "this classifier") -> tuple[Any, list[int]]:
        """The feature model with the classifier (and the temperature) folded into a ``Dense`` layer named
        "classifier" and a softmax (see :mod:`transferkit.export`).

        Raises:
            TransferkitError: the classifier is not linear (named ``classifier_name`` in the message).
        """
        import keras

        from transferkit.features.classifiers import fold_linear_classifier

        kernel, bias, classes = fold_linear_classifier(self.classifier, classifier_name)
        extractor = self.feature_extractor
        classifier = keras.layers.Dense(len(bias), name="classifier")
        probabilities = keras.layers.Softmax(name="probabilities")(classifier(extractor.output))
        model = keras.Model(extractor.inputs[0], probabilities, name=f"{extractor.name}_classifier")
        classifier.set_weights([(kernel / self.temperature).astype(np.float32),
                                (bias / self.temperature).astype(np.float32)])
        return model, [int(c) for c in classes]

    @classmethod
    def load(cls, folder: Path, trusted: Iterable[str] = ()) -> "FeaturePredictor":
        """Raises TransferkitError: no classifier, one pickled by an older transferkit, or one holding
        types that are not trusted."""
        from transferkit.features.persistence import load_classifier, saved_classifier

        model = folder / "model"
        path = saved_classifier(model / "classifier")
        if path is None:
            old = " a pickle (model/classifier.joblib), which is never opened because it could run code" if (
                model / "classifier.joblib").exists() else " no classifier"
            raise TransferkitError(f"{folder} holds{old}: re-run `transferkit extract` with its recipe.yaml "
                                   f"to save the classifier safely")
        return cls(_load_keras_model(model / "feature_extractor.keras"), load_classifier(path, trusted)[0],
                   _temperature(model / "calibration.json"))


#: The predictor a strategy's run folder holds; the other strategies' is a :class:`KerasPredictor`.
PREDICTORS = {"extract": FeaturePredictor}


def _temperature(path: Path) -> float:
    """The calibration temperature saved at ``path``; 1.0 (none) for a run saved without one.

    Raises TransferkitError: the file is damaged."""
    if not path.is_file():
        return 1.0
    try:
        temperature = float(json.loads(path.read_text())["temperature"])
    except (ValueError, KeyError, TypeError) as error:
        raise TransferkitError(f"{path} is damaged ({type(error).__name__}: {error}): train the run again") from None
    if not 0 < temperature < float("inf"):
        raise TransferkitError(f"{path}: temperature {temperature} is not a positive number: train the run again")
    return temperature


def _load_keras_model(path: Path, **options):
    """A run's ``.keras`` model, loaded in safe mode; missing, damaged or unsafe (a Lambda layer): one line."""
    import keras

    import transferkit.models.layers  # noqa: F401  (registers transferkit's layers for deserialisation)

    if not path.is_file():
        raise TransferkitError(f"{path} is missing: train the run again")
    try:
        return keras.saving.load_model(path, safe_mode=True, **options)
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file is a one-line error, never a traceback
        first = str(error).strip().splitlines()[0] if str(error).strip() else "damaged file"
        raise TransferkitError(f"{path}: cannot be loaded safely ({type(error).__name__}: {first}): "
                               f"train the run again") from None
