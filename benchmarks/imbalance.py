"""Class imbalance on pneumonia28: the same recipe plain, with ``data.class_weight: balanced`` and (fine-tune)
with ``data.sampling: balanced``.

    KERAS_HOME=../shared/keras_home python benchmarks/imbalance.py                # extract and a short fine-tune
    KERAS_HOME=../shared/keras_home python benchmarks/imbalance.py --no-finetune  # extract only
    python benchmarks/imbalance.py --per-split 200                                # a quick look on fewer images

pneumonia28 (28 px chest X-rays) comes with fixed splits (``splits.csv``): train 4690 images (3477
pneumonia, 1213 normal), val 524 (389 : 135), test 624 (390 : 234). They are copied into
``train/``, ``val/`` and ``test/`` class folders in a temporary folder, so every run sees the same
split. Each strategy runs with the same recipe and seed, once plain and once with balanced class
weights (counted on the training split); the fine-tune also once with balanced sampling (each epoch
draws as many images, with replacement, each class equally likely; for extract's classifier that
setting is the balanced weights again, so it is not run twice): extract picks its classifier's C by
cross-validated log-loss on the training split; the fine-tune trains a fixed number of epochs.
Both are reported on the validation and the test split, which no choice looked at.
"""

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "pneumonia28"
SPLITS = ("train", "val", "test")


def copy_splits(source: Path, target: Path, per_split: int | None, seed: int = 0) -> dict[str, Path]:
    """``target/<split>/<class>/`` for each split of ``source/splits.csv`` (at most ``per_split`` images each, a
    seeded random pick), copied rather than linked: links out of a data folder are not followed."""
    with open(source / "splits.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        chosen = [row for row in rows if row["split"] == split]
        if per_split is not None and per_split < len(chosen):
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), per_split, replace=False))]
        for row in chosen:
            place = target / split / row["label"] / Path(row["path"]).name
            place.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / row["path"], place)
    return {split: target / split for split in SPLITS}


def recipes(folders: dict[str, Path], runs: Path, size: int, epochs: int, finetune: bool):
    """``(strategy, balancing, recipe)`` for each run: extract, then (if asked) a short fine-tune."""
    import transferkit as tk

    data = {"train": str(folders["train"]), "val": str(folders["val"]), "test": str(folders["test"]),
            "image_size": size, "batch_size": 64}
    plans = {"extract": {"strategy": "extract", "backbone": {"name": "mobilenet_v2"},
                         "extract": {"layer": "block_15_add"}}}
    if finetune:
        plans["finetune"] = {"strategy": "finetune", "backbone": {"name": "mobilenet_v2", "alpha": 0.35},
                             "warmup": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
                             "finetune": {"epochs": epochs, "unfreeze": {"top_blocks": 3},
                                          "optimizer": {"name": "adam", "learning_rate": 1e-4}}}
    balancings = {"none": {}, "class_weight": {"class_weight": "balanced"}, "sampling": {"sampling": "balanced"}}
    for strategy, plan in plans.items():
        for balancing, setting in balancings.items():
            if strategy == "extract" and balancing == "sampling":
                continue
            name = f"pneumonia28-{strategy}-{balancing}"
            yield strategy, balancing, tk.load_recipe({
                "name": name, "seed": 0, **plan, "data": {**data, **setting}, "output": str(runs / name)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="pneumonia28 with its splits.csv")
    parser.add_argument("--per-split", type=int, default=None, help="at most this many images per split")
    parser.add_argument("--size", type=int, default=96, help="input size (the 28 px images are upscaled)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after one warm-up epoch")
    parser.add_argument("--no-finetune", action="store_true", help="extract only")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(ROOT.parent / "shared" / "keras_home"))

    import transferkit as tk

    rows = []
    with tempfile.TemporaryDirectory() as work:
        folders = copy_splits(Path(args.data), Path(work) / "pneumonia28", args.per_split)
        for strategy, balancing, recipe in recipes(folders, Path(work) / "runs", args.size, args.epochs,
                                                      not args.no_finetune):
            started = time.perf_counter()
            train = tk.extract if strategy == "extract" else tk.finetune
            run = train(recipe, progress=False)
            rows.append((strategy, balancing, run.metrics, time.perf_counter() - started))

    print("| strategy | balanced by | val top-1 | val balanced acc. | test top-1 | test balanced acc. | "
          "test normal recall | test pneumonia recall | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for strategy, balancing, metrics, seconds in rows:
        val, test = metrics["val"], metrics["test"]
        recall = {name: scores["recall"] for name, scores in test["per_class"].items()}
        print(f"| {strategy} | {balancing} | {val['top1']:.3f} | {val['balanced_accuracy']:.3f} | "
              f"{test['top1']:.3f} | {test['balanced_accuracy']:.3f} | {recall['normal']:.3f} | "
              f"{recall['pneumonia']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
