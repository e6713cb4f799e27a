"""Classifier fit time: the cross-validated grid search on pooled features, per joblib backend.

Prints the seconds of `transferkit.features.classifiers.build_classifier(...).fit` (logistic_regression with
its default 7-value C grid, 5 folds) under joblib's process pool (loky, scikit-learn's default) and
under transferkit's thread pool (`fit_classifier`), on MobileNetV2 pooled features of flowers5
(train split of val: 0.2, 3453 x 1280; extracted once into the feature store) or, with --synthetic,
Gaussian features of the same shape.

    KERAS_HOME=../shared/keras_home python benchmarks/classifier_fit.py [--synthetic] [--repeat 2]
"""

import argparse
import os
import time

import numpy as np

from common import SHARED


def real_features(data: str):
    """The train split's pooled MobileNetV2 features (224 px, no flip averaging), cached in the feature store."""
    from transferkit.recipe import load_recipe
    from transferkit.recipe import recipe_splits
    from transferkit.strategies import preflight
    from transferkit.strategies.extract import cached_features, feature_extractor

    recipe = load_recipe({"name": "bench", "data": {"train": data, "val": 0.2, "image_size": 224},
                          "backbone": {"name": "mobilenet_v2", "alpha": 1.0}, "strategy": "extract",
                          "extract": {"tta": False}, "output": "/tmp/transferkit-bench-run"})
    image_size = preflight(recipe)
    train = recipe_splits(recipe).train
    return cached_features(recipe, feature_extractor(recipe, image_size), image_size, {"train": train}, True)["train"]


def synthetic_features(n: int = 3453, dim: int = 1280, classes: int = 5):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 0.3, (classes, dim))
    return (np.abs(rng.normal(0, 1, (n, dim)) + centres[labels])).astype("float32"), labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "datasets" / "flowers5"))
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--classifier", default="logistic_regression")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras_home"))

    import joblib

    from transferkit.features.classifiers import build_classifier, fit_classifier

    x, y = synthetic_features() if args.synthetic else real_features(args.data)
    print(f"features {x.shape[0]} x {x.shape[1]}, {len(np.unique(y))} classes, {os.cpu_count()} CPUs")
    fits = {"loky (processes)": lambda model: model.fit(x, y),
            "threads (transferkit)": lambda model: fit_classifier(model, x, y)}
    for _ in range(args.repeat):  # alternating, so that other load on the machine hits both alike
        for name, fit in fits.items():
            model = build_classifier(args.classifier, seed=0, n_samples_per_class=int(np.bincount(y).min()))
            with joblib.parallel_config(backend="loky") if name.startswith("loky") else _nothing():
                started = time.perf_counter()
                fit(model)
            print(f"{name:22s} {time.perf_counter() - started:7.1f} s  best {model.best_params_} "
                  f"cv accuracy {model.best_score_:.4f}", flush=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
