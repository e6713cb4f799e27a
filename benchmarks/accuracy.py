"""Accuracy of the shipped recipes on the datasets in ../shared, as one table.

    KERAS_HOME=../shared/keras_home python benchmarks/accuracy.py            # extract recipes (minutes)
    KERAS_HOME=../shared/keras_home python benchmarks/accuracy.py --all      # + fine-tuning (about 15 min more)

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
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(ROOT.parent / "shared" / "keras_home"))

    import transferkit as tk

    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for name in QUICK + (SLOW if args.all else []):
            recipe = tk.load_recipe(ROOT / "recipes" / name, overrides=[f"output={Path(runs) / name}"])
            started = time.perf_counter()
            train = tk.extract if recipe.strategy == "extract" else tk.finetune
            run = train(recipe, progress=False)
            rows.append((name, recipe.strategy, run.metrics["val"], run.metrics.get("test"),
                         time.perf_counter() - started))

    print(f"| recipe | strategy | val top-1 | val loss | test top-1 | n val | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, strategy, val, test, seconds in rows:
        test_top1 = f"{test['top1']:.3f}" if test else "-"
        print(f"| {name} | {strategy} | {val['top1']:.3f} | {val['loss']:.3f} | {test_top1} | {val['n']} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
