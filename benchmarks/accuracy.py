"""Accuracy of the shipped recipes on the datasets in ../shared, as one table.

    KERAS_HOME=../shared/keras_home python benchmarks/accuracy.py            # extract recipes (minutes)
    KERAS_HOME=../shared/keras_home python benchmarks/accuracy.py --all      # + fine-tuning (about 15 min more)
    python benchmarks/accuracy.py --set extract.classifier.select_by=accuracy  # any override, on every recipe

Each recipe runs into a temporary run folder; the feature store in $TRANSFERKIT_HOME is reused, so a
second invocation is faster (the seconds column says what this one took).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["digits.yaml", "flowers5_extract.yaml", "dtd10_extract.yaml"]
SLOW = ["flowers5_finetune.yaml", "digits8_imag.yaml"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the fine-tuning recipes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every recipe (repeatable)")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(ROOT.parent / "shared" / "keras_home"))

    import transferkit as tk

    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for name in QUICK + (SLOW if args.all else []):
            recipe = tk.load_recipe(ROOT / "recipes" / name, overrides=[*args.set, f"output={Path(runs) / name}"])
            started = time.perf_counter()
            train = tk.extract if recipe.strategy == "extract" else tk.finetune
            run = train(recipe, progress=False)
            rows.append((name, recipe.strategy, run.metrics, time.perf_counter() - started))
            if run.info.get("cv"):
                print(f"{name}: best {run.info['best_params']}, cv log-loss {run.info['cv']['log_loss']:.3f}, "
                      f"cv accuracy {run.info['cv']['accuracy']:.3f}")

    print("| recipe | strategy | val top-1 | val loss | test top-1 | test loss | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, strategy, metrics, seconds in rows:
        cells = [f"{metrics[split]['top1']:.3f} (n={metrics[split]['n']}) | {metrics[split]['loss']:.3f}"
                 if split in metrics else "- | -" for split in ("val", "test")]
        print(f"| {name} | {strategy} | {cells[0]} | {cells[1]} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
