"""The result of training, whatever the strategy, and the run folder it lives in.

Run folder layout::

    runs/<name>/
      recipe.yaml                  the resolved recipe
      run.json                     strategy, class names, input size, metrics, timings, versions
      model/feature_extractor.keras + model/classifier.npz | .skops + model/calibration.json  (extract)
      model/model.keras            images -> class probabilities (finetune, imag; extract after export)
      history.json, history.csv, curves.png, diagnosis.txt       (finetune, imag)
      val_*.{json,csv,png,txt}, test_*...                       evaluation reports
      report.html                  all of it on one offline page (`transferkit report`)
    runs/<name>.partial/           a run being written (and a fine-tuning run's checkpoints)
    runs/.<name>.lock              locked while a process writes runs/<name>

A run's :class:`~transferkit.predictors.Predictor` turns images into class probabilities and knows its
files under ``model/``.

A run is written into ``<name>.partial`` and replaces ``<name>`` whole when it is complete (see
:mod:`transferkit.outputs`), so a run folder is never half old, half new.

A run folder is data, safe to open from anyone: it holds no pickle. Keras models load with
``safe_mode=True``; the classifier is arrays (linear ones, ``.npz``) or a ``skops`` file opened only
when it holds trusted types (see :mod:`transferkit.features.persistence`). ``recipe.yaml`` is read as data: its
import paths (``head.custom``, ``schedule.function``, a classifier path) are not imported by
:meth:`Run.load`, ``predict``, ``evaluate`` or ``export``.

Example:
    >>> run = Run.load("runs/digits")
    >>> run.predict(["one.png", "two.png"]).argmax(axis=1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.io import atomic_write_json, atomic_write_text
from transferkit.predictors import PREDICTORS, FeaturePredictor, KerasPredictor, Predictor  # noqa: F401
from transferkit.recipe import Recipe, load_recipe


#: The class :meth:`Run.classify` gives an image whose top probability is below ``min_confidence``.
UNCERTAIN = "uncertain"


@dataclass(init=False)
class Run:
    """A trained classifier with its recipe, metrics and history.

    Attributes:
        recipe: the resolved recipe it was trained with.
        class_names: output index -> class name.
        image_size: the square input size images are resized to.
        predictor: raw images -> class probabilities: a :class:`KerasPredictor` (fine-tuning
            strategies) or a :class:`FeaturePredictor` (extract).
        metrics: ``{"val": {...}, "test": {...}}`` from :func:`transferkit.reports.evaluate.evaluate_predictions`.
        history: per-epoch curves (fine-tuning); empty for extract.
        info: timings and anything else worth keeping.
        folder: the run folder, once saved or loaded.
    """
    recipe: Recipe
    class_names: list[str]
    image_size: int
    predictor: Predictor
    metrics: dict
    history: dict
    info: dict
    folder: Path | None

    def __init__(self, recipe: Recipe, class_names: list[str], image_size: int, predictor: Predictor,
                 *, metrics: dict | None = None, history: dict | None = None, info: dict | None = None,
                 folder: Path | None = None):
        self.recipe, self.class_names, self.image_size, self.predictor = recipe, class_names, image_size, predictor
        self.metrics = {} if metrics is None else metrics
        self.history = {} if history is None else history
        self.info = {} if info is None else info
        self.folder = folder

    @property
    def model(self):
        """A fine-tuned run's Keras model (images -> probabilities); None for an extract run, whose
        parts are ``run.predictor.feature_extractor`` and ``run.predictor.classifier``."""
        return getattr(self.predictor, "model", None)

    @property
    def strategy(self) -> str:
        return self.recipe.strategy

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Class probabilities ``[N, classes]`` for image paths or a uint8/float array ``[N, S, S, 3]``."""
        from transferkit.data.decode import load_images

        if not isinstance(images, np.ndarray):
            images = load_images(list(map(str, images)), self.image_size)
        return self.predictor.predict(images, batch_size)

    def classify(self, inputs, top_k: int = 5, min_confidence: float = 0.0) -> tuple[list[dict], list[tuple[str, str]]]:
        """Predict image files and folders (searched recursively); unreadable files are skipped.

        Args:
            inputs: image files and folders.
            top_k: classes listed per image.
            min_confidence: an image whose top probability is below this gets the class
                :data:`UNCERTAIN` instead of a guess (its ``top`` still lists the candidates).

        Returns:
            ``(rows, skipped)``: per image ``{"path", "class", "probability", "top": [[class, p], ...]}``,
            and the ``(path, reason)`` pairs that could not be read (also listed in one warning).
        """
        from transferkit.data.folders import find_images

        if not 0.0 <= min_confidence <= 1.0:
            raise TransferkitError(f"min_confidence must be within 0..1, got {min_confidence}: e.g. 0.8")
        paths, skipped = find_images(inputs)
        if not paths:
            raise TransferkitError(f"no readable images in {', '.join(map(str, inputs))}")
        probabilities = self.predict(paths)
        order = np.argsort(-probabilities, axis=1)[:, :top_k]
        rows = [{"path": path, "class": self.class_names[best[0]] if p[best[0]] >= min_confidence else UNCERTAIN,
                 "probability": float(p[best[0]]), "top": [[self.class_names[i], float(p[i])] for i in best]}
                for path, p, best in zip(paths, probabilities, order)]
        return rows, skipped

    def evaluate(self, data: str | Path | None = None) -> dict:
        """Evaluate on a class-per-folder ``data`` folder, or again on the run's own test (else val) split.

        Reports go to ``<run>/evaluations/<data folder name>/`` (or the run folder itself for its own split).

        Returns:
            The metrics of :func:`transferkit.reports.evaluate.evaluate_predictions`.
        """
        from transferkit.data.folders import scan_folder
        from transferkit.reports.evaluate import write_report
        from transferkit.outputs import folder_lock
        from transferkit.recipe import recipe_splits

        run_folder = Path(self.folder or self.recipe.output)
        if data is not None:
            images, prefix = scan_folder(data, class_names=self.class_names,
                                         follow_links=self.recipe.data.follow_links), "eval"
            folder = run_folder / "evaluations" / Path(data).resolve().name
        else:
            splits = recipe_splits(self.recipe)
            prefix = "test" if splits.test is not None else "val"
            images, folder = getattr(splits, prefix), run_folder
            if images is None:
                raise TransferkitError("the recipe has neither a test nor a val split: pass --data DIR")
        probabilities = self.predict(images.paths)
        with folder_lock(run_folder):  # not while a run is replacing the folder
            return write_report(folder, images.labels, probabilities, self.class_names, paths=images.paths,
                                prefix=prefix)

    def save(self, folder: str | Path | None = None) -> Path:
        """Write the run folder (default: the recipe's ``output``); every file is written atomically.

        Raises:
            TransferkitError: an extract run's classifier cannot be saved without pickle.
        """
        folder = Path(folder or self.recipe.output)
        (folder / "model").mkdir(parents=True, exist_ok=True)
        self.predictor.save(folder)
        atomic_write_text(folder / "recipe.yaml", self.recipe.to_yaml())
        atomic_write_json(folder / "run.json", self._summary())
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | Path, trusted: Iterable[str] = ()) -> "Run":
        """Load a run folder written by :meth:`save`; needs neither the training data nor the network.

        Nothing in the folder is run as code: see the module docstring.

        Args:
            folder: the run folder.
            trusted: type names to open besides transferkit's own classifiers, for an extract run
                whose classifier came from an import path (e.g. ``["sklearn.svm._classes.SVC"]``,
                as the error lists them). Only for folders whose source you trust.

        Raises:
            TransferkitError: not a run folder, a classifier pickled by an older transferkit, or one
                holding types that are not trusted.
        """
        from transferkit.outputs import read_run_json

        folder = Path(folder)
        summary = read_run_json(folder)
        strategy, class_names, image_size = summary["strategy"], summary["class_names"], summary["image_size"]
        predictor = PREDICTORS.get(strategy, KerasPredictor).load(folder, trusted)
        return cls(recipe=load_recipe(folder / "recipe.yaml"), class_names=class_names, image_size=image_size,
                   predictor=predictor, metrics=summary.get("metrics", {}), history=summary.get("history", {}),
                   info=summary.get("info", {}), folder=folder)

    def _summary(self) -> dict:
        import keras
        import sklearn

        from transferkit.version import __version__

        return {"strategy": self.strategy, "class_names": self.class_names, "image_size": self.image_size,
                "metrics": self.metrics, "history": self.history, "info": self.info,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": {"transferkit": __version__, "keras": keras.__version__,
                             "keras_backend": keras.backend.backend(), "scikit-learn": sklearn.__version__}}
