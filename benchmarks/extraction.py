"""Feature extraction speed: transferkit end to end against its two parts, in one run.

Prints images/s for
  decode   Pillow decode + resize of the JPEGs to uint8 (transferkit.data.decode.load_images, a thread pool),
  forward  the cut backbone on pre-decoded float32 batches (compiled predict_on_batch in a loop),
  predict  Keras' predict on the whole pre-decoded array (its data adapter included),
  e2e      transferkit's extraction into a fresh feature store: building the model, decoding,
           the forward pass and the HDF5 writes, all timed,
and the ratios e2e / forward and e2e / min(decode, forward).

    KERAS_HOME=../shared/keras_home python benchmarks/extraction.py --images 1024
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import SHARED, pick_images


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "datasets" / "flowers5"))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras_home"))

    import keras

    from transferkit.models.backbones import create_backbone
    from transferkit.data.decode import load_images
    from transferkit.recipe import load_recipe
    from transferkit.strategies.extract import cache_features
    from transferkit.models.surgery import cut

    chosen = pick_images(args.data, args.images)
    paths, n = chosen.paths, len(chosen)

    started = time.perf_counter()
    pixels = load_images(paths, args.size)
    decode = n / (time.perf_counter() - started)
    pixels = pixels.astype("float32")  # what the model takes; not part of decoding

    extractor = cut(create_backbone(args.backbone, image_size=args.size), "top")
    batches = [pixels[i:i + args.batch] for i in range(0, n, args.batch)]
    extractor.predict_on_batch(batches[0])  # compile outside the timing
    if len(batches[-1]) != args.batch:
        extractor.predict_on_batch(batches[-1])
    started = time.perf_counter()
    for batch in batches:
        extractor.predict_on_batch(batch)
    forward = n / (time.perf_counter() - started)
    started = time.perf_counter()
    extractor.predict(pixels, batch_size=args.batch, verbose=0)
    predict = n / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as home:
        subset = chosen.copy_to(Path(home) / "images")  # copies: links out of a data folder are skipped
        os.environ["TRANSFERKIT_HOME"] = str(Path(home) / "cache")
        recipe = load_recipe({"data": {"train": str(subset), "val": None, "image_size": args.size,
                                       "batch_size": args.batch},
                              "backbone": {"name": args.backbone},
                              "extract": {"tta": False, "power_norm": False}})
        started = time.perf_counter()
        cache_features(recipe, progress=False)
        e2e = n / (time.perf_counter() - started)

    print(f"{args.backbone} @ {args.size}px, batch {args.batch}, {n} JPEGs from {args.data}, "
          f"keras {keras.__version__} on {keras.backend.backend()}, {os.cpu_count()} CPUs")
    print(f"decode   {decode:8.1f} img/s")
    print(f"forward  {forward:8.1f} img/s")
    print(f"predict  {predict:8.1f} img/s")
    print(f"e2e      {e2e:8.1f} img/s")
    print(f"e2e / forward             {e2e / forward:.2f}")
    print(f"e2e / min(decode, forward) {e2e / min(decode, forward):.2f}")


if __name__ == "__main__":
    main()
