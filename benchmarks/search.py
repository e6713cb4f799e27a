"""The table's answer against the searched one, on the same held-out test split.

    KERAS_HOME=../shared/keras_home python benchmarks/search.py ../shared/datasets/dtd10 --budget 10m

For a dataset it runs, as a user would, from a scratch folder:

1. `transferkit recommend --data DIR --set data.test=T --write table.yaml` (the decision table's recipe),
   then that recipe (extract or finetune): the table's own test figure;
2. `transferkit recommend --data DIR --budget B --set data.test=T --write searched.yaml` (the search,
   timed against its budget), then the written recipe: the searched plan's test figure.

Both recipes split the same way (the same seed), so their test splits are the same images, which the
search never sees. Prints one table row per plan.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def transferkit(*args, cwd):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transferkit", *map(str, args)], cwd=cwd, text=True,
                            capture_output=True)
    if result.returncode != 0:
        sys.exit(f"transferkit {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def run_recipe(path: Path, cwd) -> dict:
    """Run a written recipe with the command it names; its run.json's metrics."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    command = "extract" if recipe["strategy"] == "extract" else "finetune"
    seconds = transferkit(command, path, "--quiet", "--set", f"output={Path(cwd) / 'runs' / path.stem}", cwd=cwd)
    metrics = json.loads((Path(cwd) / "runs" / path.stem / "run.json").read_text())["metrics"]
    return {"strategy": recipe["strategy"], "seconds": seconds, **metrics}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a class-per-folder dataset")
    parser.add_argument("--budget", default="10m", help="the search's budget (default 10m)")
    parser.add_argument("--test", default="0.2", help="the held-out test fraction (default 0.2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for both")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(ROOT.parent / "shared" / "keras_home"))
    data = Path(args.data).resolve()
    overrides = [item for kv in [f"data.test={args.test}", *args.set] for item in ("--set", kv)]

    with tempfile.TemporaryDirectory() as scratch:
        transferkit("recommend", "--data", data, "--write", "table.yaml", *overrides, cwd=scratch)
        table = run_recipe(Path(scratch) / "table.yaml", scratch)
        searching = transferkit("recommend", "--data", data, "--budget", args.budget, "--write", "searched.yaml",
                                *overrides, cwd=scratch)
        searched = run_recipe(Path(scratch) / "searched.yaml", scratch)
        summary = json.loads((Path(scratch) / "runs" / "searched" / "tune" / "tune.json").read_text())

    print(f"{data.name}: search {searching:.0f} s wall for a {args.budget} budget "
          f"({summary['seconds_spent']:.0f} s in trials), "
          f"{sum(not row['note'].startswith('not run') for row in summary['trials'])} plans tried")
    print("| plan | strategy | val top-1 | val loss | test top-1 | test loss | seconds to run |")
    print("|---|---|---|---|---|---|---|")
    for name, row in (("the table's", table), ("searched", searched)):
        print(f"| {name} | {row['strategy']} | {row['val']['top1']:.3f} | {row['val']['loss']:.3f} | "
              f"{row['test']['top1']:.3f} (n={row['test']['n']}) | {row['test']['loss']:.3f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
