"""Fine-tuning speed: transferkit's training epochs against a hand-written model.fit, same model and batch.

transferkit: `transferkit.finetune` on a folder of JPEGs (decode in the input pipeline, one-hot
labels, checkpoint and monitor files every epoch). Hand-written: the same classifier
(`transferkit.models.heads.attach_head`, whole body trainable) compiled with the same optimizer and loss,
`model.fit` on pre-decoded in-memory arrays. Both validate on the same images every epoch. The first
epoch (compilation) is left out; images/s is training images over the mean epoch time of the rest.

    KERAS_HOME=../shared/keras_home python benchmarks/finetune_step.py --images 512 --epochs 3
"""

import os
import tempfile
import time
from pathlib import Path

from common import SHARED, pick_images, training_arguments


def main():
    parser = training_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras_home"))

    import keras
    import numpy as np

    from transferkit.models.backbones import create_backbone
    from transferkit.data.decode import load_images
    from transferkit.models.heads import attach_head
    from transferkit.recipe import load_recipe
    from transferkit.recipe import recipe_splits
    from transferkit.strategies.finetune import finetune

    chosen = pick_images(args.data, args.images + args.images // 8)
    classes = len(chosen.class_names)

    with tempfile.TemporaryDirectory() as home:
        subset = chosen.copy_to(Path(home) / "images")  # copies: links out of a data folder are skipped
        recipe = load_recipe({
            "seed": 0, "strategy": "finetune", "output": str(Path(home) / "run"),
            "data": {"train": str(subset), "val": 1 / 9, "image_size": args.size, "batch_size": args.batch},
            "backbone": {"name": args.backbone}, "head": {"dropout": 0.2},
            "warmup": {"epochs": 0},
            "finetune": {"epochs": args.epochs, "unfreeze": "all",
                         "optimizer": {"name": "adam", "learning_rate": 1e-4}, "schedule": {"name": "constant"}}})
        run = finetune(recipe, progress=False)
        n_train = run.info["images"]["train"]
        ours = n_train / float(np.mean(run.history["seconds"][1:]))
        splits = recipe_splits(run.recipe)  # the run's own train / val images
        x_train = load_images(splits.train.paths, args.size).astype("float32")
        x_val = load_images(splits.val.paths, args.size).astype("float32")
    y_train = np.eye(classes, dtype="float32")[splits.train.labels]
    y_val = np.eye(classes, dtype="float32")[splits.val.labels]
    model = attach_head(create_backbone(args.backbone, image_size=args.size), classes, dropout=0.2)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", metrics=["accuracy"])
    timer = _epoch_timer()
    model.fit(x_train, y_train, batch_size=args.batch, epochs=args.epochs, validation_data=(x_val, y_val),
              callbacks=[timer], verbose=0)
    hand = len(x_train) / float(np.mean(timer.seconds[1:]))

    print(f"{args.backbone} @ {args.size}px, batch {args.batch}, {n_train} training images, whole body trained, "
          f"keras {keras.__version__} on {keras.backend.backend()}, {os.cpu_count()} CPUs")
    print(f"transferkit finetune  {ours:8.1f} img/s  (epochs 2-{args.epochs}: {run.history['seconds'][1:]} s)")
    print(f"hand-written fit      {hand:8.1f} img/s  (epochs 2-{args.epochs}: {[round(s, 3) for s in timer.seconds[1:]]} s)")
    print(f"ratio                 {ours / hand:.2f}")


def _epoch_timer():
    """A callback that records each epoch's wall time in ``.seconds``."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._started)

    return EpochTimer()


if __name__ == "__main__":
    main()
