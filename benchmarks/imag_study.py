"""Does imag mode help? Normal training against imag, paired by seed, from scratch and in transfer.

    KERAS_HOME=../shared/keras_home python benchmarks/imag_study.py --quick     # under 10 minutes
    KERAS_HOME=../shared/keras_home python benchmarks/imag_study.py             # the full study (about an hour)

Each cell is one `transferkit compare` (Python API) with its own folder under --output, so an
interrupted study goes on where it stopped when run again. The cells:

* from scratch (random weights), on digits8 upsized to 32 px (10 classes): MobileNet V1 (alpha 0.25),
  MobileNet V2 (alpha 0.35), and a small CNN (about 290 K parameters) with and without dropout;
* in transfer (ImageNet MobileNetV2 alpha 0.35, linear-probe warm-up, then fine-tuning of the whole
  body), on a 100-per-class subset of flowers5 and on dtd10, at 96 px;
* the imag knobs on the small CNN: ``imag.train: head`` against ``head_and_body``, and imag episodes
  every 2 normal epochs against every 4.

Prints, per cell and measure, normal and imag as mean ± std over seeds, the paired difference with its
95% CI and p-value, and a verdict: *helps* / *hurts* where the CI of the best validation top-1
difference lies wholly above / below zero, else *no measurable difference*.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MEASURES = {"best_top1": "best val top-1", "final_top1": "final val top-1", "final_train_top1": "final train top-1",
            "best_loss": "best val loss"}


def small_cnn(dropout: float):
    """A function building a small CNN on raw 0..255 pixels (fresh weights on each call)."""
    def build():
        import keras

        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Rescaling(1 / 255.0)(inputs)
        for width in (32, 64, 128):
            for _ in range(2 if width < 128 else 1):
                x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
            x = keras.layers.MaxPooling2D()(x)
            if dropout:
                x = keras.layers.Dropout(dropout)(x)
        return keras.Model(inputs, x, name=f"small_cnn_dropout{dropout:g}")
    return build


def subset(source: Path, per_class: int, folder: Path) -> Path:
    """The first ``per_class`` images of each class of ``source``, copied into ``folder`` (once)."""
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        for cls in sorted(p for p in source.iterdir() if p.is_dir()):
            (staging / cls.name).mkdir(parents=True)
            for image in sorted(cls.iterdir())[:per_class]:
                shutil.copyfile(image, staging / cls.name / image.name)
        staging.rename(folder)
    return folder


def cells(quick: bool, scratch: Path) -> list[dict]:
    """The study's comparisons: name, recipe, modes and their settings, and a backbone function."""
    epochs, imag = (6, {"normal_epochs": 2, "imag_epochs": 1}) if quick else (12, {"normal_epochs": 4, "imag_epochs": 1})
    digits = {"train": str(SHARED / "datasets" / "digits8"), "val": 0.2, "image_size": 32, "batch_size": 32}
    from_scratch = {"strategy": "imag", "data": digits, "head": {"pooling": "avg", "dropout": 0.0},
                    "warmup": {"epochs": 0}, "imag": imag,
                    "finetune": {"unfreeze": "all", "epochs": epochs, "optimizer": {"name": "adam", "learning_rate": 1e-3},
                                 "schedule": {"name": "cosine"}}, "calibrate": "none"}
    transfer = {"strategy": "imag", "head": {"pooling": "avg", "dropout": 0.2},
                "backbone": {"name": "mobilenet_v2", "alpha": 0.35, "weights": "imagenet"},
                "warmup": {"linear_probe": True, "epochs": 0}, "imag": {"normal_epochs": 2, "imag_epochs": 1},
                "finetune": {"unfreeze": "all", "epochs": 4 if quick else 6,
                             "optimizer": {"name": "adamw", "learning_rate": 3e-4, "weight_decay": 1e-4},
                             "schedule": {"name": "cosine"}}, "calibrate": "none"}
    knobs = {"imag_head": ["strategy=imag", "imag.train=head"],
             "imag_every2": ["strategy=imag", "imag.normal_epochs=2"]}
    table = [
        {"name": "scratch-cnn-dropout", "setting": "from scratch", "data": "digits8", "model": "small CNN + dropout 0.25",
         "recipe": from_scratch, "backbone": small_cnn(0.25)},
        {"name": "scratch-cnn", "setting": "from scratch", "data": "digits8", "model": "small CNN", "recipe": from_scratch,
         "backbone": small_cnn(0.0), "settings": {} if quick else knobs},
        {"name": "transfer-dtd10", "setting": "transfer", "data": "dtd10", "model": "MobileNetV2 0.35 (ImageNet)",
         "recipe": {**transfer, "data": {"train": str(SHARED / "datasets" / "dtd10"), "val": 0.2, "image_size": 96,
                                         "batch_size": 32}}},
    ]
    if not quick:
        table[1:1] = [
            {"name": f"scratch-{name}", "setting": "from scratch", "data": "digits8", "model": label,
             "recipe": {**from_scratch, "backbone": {"name": name, "alpha": alpha, "weights": None},
                        # random BatchNorm statistics must be learned, and Keras' momentum of 0.999 is too slow for
                        # 12 short epochs: frozen or slow, they keep validation at chance
                        "finetune": {**from_scratch["finetune"], "unfreeze": {"all": True, "train_batchnorm": True,
                                                                              "batchnorm_momentum": 0.9}}}}
            for name, alpha, label in (("mobilenet", 0.25, "MobileNet V1 0.25"), ("mobilenet_v2", 0.35, "MobileNet V2 0.35"))]
        flowers = subset(SHARED / "datasets" / "flowers5", 100, scratch / "flowers5_subset")
        table.append({"name": "transfer-flowers5", "setting": "transfer", "data": "flowers5 (100 a class)",
                      "model": "MobileNetV2 0.35 (ImageNet)",
                      "recipe": {**transfer, "data": {"train": str(flowers), "val": 0.2, "image_size": 96,
                                                      "batch_size": 32}}})
    return table


def run_cell(cell: dict, seeds: int, output: Path) -> dict:
    from transferkit import load_recipe
    from transferkit.strategies.compare import compare

    settings = cell.get("settings") or {}
    recipe = load_recipe({"name": cell["name"], "seed": 0, **cell["recipe"], "output": str(output / cell["name"])})
    started = time.perf_counter()
    summary = compare(recipe, modes=["normal", "imag", *settings], seeds=seeds, settings=settings,
                      backbone=cell.get("backbone"))
    summary["seconds"] = time.perf_counter() - started
    return summary


def rows(cell: dict, summary: dict) -> list[str]:
    """Markdown rows: per imag mode and measure, both means ± std, the paired difference, CI, p, verdict."""
    lines = []
    for mode, differences in summary["differences"].items():
        best = differences["best_top1"]
        verdict = ("helps" if best["ci"][0] > 0 else "hurts" if best["ci"][1] < 0 else "no measurable difference")
        for key, label in MEASURES.items():
            a, b, d = summary["stats"]["normal"][key], summary["stats"][mode][key], differences[key]
            lines.append(f"| {cell['setting']} | {cell['data']} | {cell['model']} | {mode} | {label} | {a['mean']:.3f} ± {a['std']:.3f} "
                         f"| {b['mean']:.3f} ± {b['std']:.3f} | {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] "
                         f"| {d['p']:.2f} | {verdict if key == 'best_top1' else ''} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cells, seeds and epochs: under 10 minutes")
    parser.add_argument("--seeds", type=int, help="seeds per mode (default: 2 quick, 3 full)")
    parser.add_argument("--output", default="runs/imag_study", help="one compare folder per cell (reused on rerun)")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 3)
    output = Path(args.output) / ("quick" if args.quick else "full")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines = ["| setting | data | model | mode | measure | normal | imag mode | imag − normal [95% CI] | p | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    timings = []
    for cell in cells(args.quick, output):
        print(f"== {cell['name']} ({seeds} seeds)", file=sys.stderr, flush=True)
        summary = run_cell(cell, seeds, output)
        lines += rows(cell, summary)
        timings.append(f"{cell['name']} {summary['seconds']:.0f} s")
    table = "\n".join(lines)
    print(table)
    print(f"\nseeds {seeds}; {', '.join(timings)}; {time.perf_counter() - started:.0f} s in all")
    (output / "study.md").write_text(table + "\n")
    (output / "study.json").write_text(json.dumps({"seeds": seeds, "quick": args.quick, "timings": timings}))


if __name__ == "__main__":
    main()
