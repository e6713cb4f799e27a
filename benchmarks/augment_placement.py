"""Where augmentation costs least: fine-tuning epochs with it in the input pipeline, in the model, or off.

Runs `transferkit.finetune` on the same images three times, `data.augment_on: pipeline`, `model` and
no augmentation at all, and prints training images/s (the mean of epochs 2.., as the first compiles)
and what the augmentation costs in each place. Decoded images are cached, so decoding is not timed
after the first epoch. `augment_on: auto` picks the place from the device (see
`transferkit.training.accelerator.augment_placement`); the last line says which it picks here.

    KERAS_HOME=../shared/keras_home python benchmarks/augment_placement.py --images 512
    KERAS_HOME=../shared/keras_home python benchmarks/augment_placement.py --train head
    KERAS_HOME=../shared/keras_home KERAS_BACKEND=jax python benchmarks/augment_placement.py
"""

import os
import tempfile
from pathlib import Path

from common import SHARED, pick_images, training_arguments

FLOWERS_AUGMENT = ["random_flip", {"random_rotation": 0.1}, {"random_zoom": 0.1}]


def main():
    parser = training_arguments(__doc__.splitlines()[0])
    parser.add_argument("--train", choices=["all", "head"], default="all",
                        help="train the whole body (finetune) or the head only (warm-up)")
    parser.add_argument("--rand-augment", action="store_true",
                        help="RandAugment instead of flowers5's flip/rotation/zoom")
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras_home"))

    import keras
    import numpy as np

    from transferkit.training.accelerator import augment_placement, gpu_available
    from transferkit.recipe import load_recipe
    from transferkit.strategies.finetune import finetune

    chosen = pick_images(args.data, args.images + args.images // 8)
    augment = ["rand_augment"] if args.rand_augment else FLOWERS_AUGMENT
    optimizer = {"name": "adam", "learning_rate": 1e-4}
    phase = ({"warmup": {"epochs": args.epochs, "optimizer": optimizer}, "finetune": {"epochs": 0}}
             if args.train == "head" else
             {"warmup": {"epochs": 0}, "finetune": {"epochs": args.epochs, "unfreeze": "all", "optimizer": optimizer,
                                                    "schedule": {"name": "constant"}}})
    rates = {}
    with tempfile.TemporaryDirectory() as home:
        subset = chosen.copy_to(Path(home) / "images")  # copies: links out of a data folder are skipped
        for place in ("pipeline", "model", "off"):
            recipe = load_recipe({
                "seed": 0, "strategy": "finetune", "output": str(Path(home) / place),
                "data": {"train": str(subset), "val": 1 / 9, "image_size": args.size, "batch_size": args.batch,
                         "cache": True, "augment": [] if place == "off" else augment,
                         "augment_on": "pipeline" if place == "off" else place},
                "backbone": {"name": args.backbone}, "head": {"dropout": 0.2}, **phase})
            run = finetune(recipe, progress=False)
            seconds = run.history["seconds"][1:]
            rates[place] = run.info["images"]["train"] / float(np.mean(seconds))
            rates[place, "epochs"] = [round(s, 2) for s in seconds]

    print(f"{args.backbone} @ {args.size}px, batch {args.batch}, {run.info['images']['train']} training images, "
          f"{'whole body' if args.train == 'all' else 'head only'} trained, augmentation "
          f"{'rand_augment' if args.rand_augment else 'flip, rotation 0.1, zoom 0.1'}, "
          f"keras {keras.__version__} on {keras.backend.backend()}, {os.cpu_count()} CPUs, "
          f"GPU: {'yes' if gpu_available() else 'no'}")
    for place in ("off", "pipeline", "model"):
        cost = "" if place == "off" else f"  augmentation costs {100 * (rates['off'] / rates[place] - 1):5.1f}% of the step"
        print(f"{place:9s} {rates[place]:8.1f} img/s{cost}  (epochs 2-{args.epochs}: {rates[place, 'epochs']} s)")
    print(f"augment_on: auto picks {augment_placement('auto')}")


if __name__ == "__main__":
    main()
