"""What the fine-tuning benchmarks share: their command-line arguments and their images."""

import argparse
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def training_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the data, image count, backbone, size, batch and epoch arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=str(SHARED / "datasets" / "flowers5"))
    parser.add_argument("--images", type=int, default=512, help="training images (plus 1/8 as many to validate)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    return parser


def pick_images(folder: str, count: int):
    """A stratified, seeded pick of ``count`` images from a class-per-folder ``folder`` (all if fewer)."""
    from transferkit.data.folders import scan_folder
    from transferkit.data.splits import stratified_split

    images = scan_folder(folder, screen=False)
    return stratified_split(images, count, seed=0)[1] if count < len(images) else images
