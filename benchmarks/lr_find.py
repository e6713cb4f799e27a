"""How good is lr-find's suggestion? The suggested rate against a grid of rates around it.

    KERAS_HOME=../shared/keras_home python benchmarks/lr_find.py                       # dtd10 and cats_dogs
    KERAS_HOME=../shared/keras_home python benchmarks/lr_find.py --datasets dtd10 --epochs 4 --factors 0.1 1 10

For each dataset, one LP-FT recipe (flowers5_finetune.yaml's settings on that dataset: MobileNetV2 1.0,
linear probe, AdamW on a cosine schedule, label smoothing; stratified 60/20/20 train/val/test split,
seed 0) is swept with ``tk.lr_find`` (its default suggestion) and then fine-tuned at the suggested
rate times each factor. The table gives val top-1 (of the weights fine-tuning kept) and test top-1 per rate, so the
suggestion can be compared with the best rate of the grid, picked on val. No rate is chosen on test.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def recipe_for(dataset: str, output: Path, size: int, epochs: int, learning_rate: float = 3e-4) -> dict:
    """flowers5_finetune.yaml's plan on ``dataset``, with a test split."""
    return {"name": f"{dataset}-lr", "seed": 0, "strategy": "finetune",
            "data": {"train": str(DATASETS / dataset), "val": 0.2, "test": 0.2, "image_size": size,
                     "batch_size": 32,
                     "augment": [{"random_flip": "horizontal"}, {"random_rotation": 0.1}, {"random_zoom": 0.1}]},
            "backbone": {"name": "mobilenet_v2", "weights": "imagenet", "alpha": 1.0},
            "head": {"pooling": "avg", "dropout": 0.2, "l2": 1e-4},
            "warmup": {"linear_probe": True, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
            "finetune": {"unfreeze": "all", "epochs": epochs,
                         "optimizer": {"name": "adamw", "learning_rate": learning_rate, "weight_decay": 1e-4},
                         "schedule": {"name": "cosine", "warmup_epochs": 1}, "label_smoothing": 0.1},
            "output": str(output)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["dtd10", "cats_dogs"])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    parser.add_argument("--factors", nargs="+", type=float, default=[0.1, 0.3, 1.0, 3.0, 10.0],
                        help="the rates tried: the suggestion times each")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(ROOT.parent / "shared" / "keras_home"))

    import transferkit as tk

    print("| dataset | suggestion | factor | learning rate | val top-1 | test top-1 | seconds |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for dataset in args.datasets:
            started = time.perf_counter()
            found = tk.lr_find(tk.load_recipe(recipe_for(dataset, Path(work) / dataset, args.size, args.epochs)),
                               progress=False)
            print(f"| {dataset} | {found.suggest} {found.learning_rate:.3g} ({found.other_suggestions()}) | sweep "
                  f"| | | | {time.perf_counter() - started:.0f} |", flush=True)
            for factor in args.factors:
                rate = float(f"{found.learning_rate * factor:.3g}")
                started = time.perf_counter()
                run = tk.finetune(tk.load_recipe(recipe_for(dataset, Path(work) / f"{dataset}-{factor:g}", args.size,
                                                            args.epochs, rate)), progress=False)
                print(f"| {dataset} | {found.suggest} | {factor:g} | {rate:.3g} | {run.metrics['val']['top1']:.3f} | "
                      f"{run.metrics['test']['top1']:.3f} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
