"""The PyTorch peer: MobileNetV2 extraction and training speed written the usual PyTorch way.

Same JPEGs, image size and batch as `extraction.py` and `finetune_step.py`, so their figures
compare. Prints images/s for
  decode    a DataLoader with worker processes decoding and resizing with Pillow (no model),
  forward   the pooled-feature forward pass on device-resident pre-decoded batches,
  e2e       DataLoader + host-to-device copy + forward, the way a PyTorch user extracts features,
  train     an Adam training step (forward, backward, update) on device-resident batches.
On a GPU the model runs channels-last under bfloat16 autocast; `--compile` adds torch.compile.
torchvision's MobileNetV2 (random weights: speed only) is used when torchvision is installed, else
the same architecture defined here (there is no CPU build of torchvision on some machines).

    python benchmarks/torch_peer.py --images 4096 --size 224 --batch 64
    python benchmarks/torch_peer.py --images 4096 --compile          # on a GPU
"""

import argparse
import os
import time

from common import SHARED, pick_images


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "datasets" / "flowers5"))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images for forward/train")
    args = parser.parse_args()

    import torch


    chosen = pick_images(args.data, args.images)
    paths, labels, n = chosen.paths, chosen.labels, len(chosen)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    memory_format = torch.channels_last if cuda else torch.contiguous_format

    loader = torch.utils.data.DataLoader(
        JpegFolder(paths, labels, args.size), batch_size=args.batch, num_workers=args.workers,
        pin_memory=cuda, persistent_workers=args.workers > 0)
    _ = [batch for batch in loader]  # start the workers, warm the file cache
    started = time.perf_counter()
    decoded = [(x, y) for x, y in loader]
    decode = n / (time.perf_counter() - started)

    model, source = mobilenet_v2(num_classes=len(chosen.class_names))
    model = model.to(device, memory_format=memory_format)
    features = model.features_and_pool if not args.compile else torch.compile(model.features_and_pool)
    on_device = [x.to(device, non_blocking=True).to(memory_format=memory_format) for x, _ in decoded]
    targets = [y.to(device) for _, y in decoded]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=cuda):
        for x in on_device[:2] + on_device[-1:]:  # warm-up (and compilation) for both batch shapes
            features(_normalize(x))
        sync()
        started = time.perf_counter()
        for _ in range(args.repeats):
            for x in on_device:
                features(_normalize(x))
        sync()
        forward = args.repeats * n / (time.perf_counter() - started)
        started = time.perf_counter()
        for x, _ in loader:
            features(_normalize(x.to(device, non_blocking=True).to(memory_format=memory_format))).float().cpu()
        sync()
        e2e = n / (time.perf_counter() - started)

    model.train()
    step = model if not args.compile else torch.compile(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(step(_normalize(x)), y)
        loss.backward()
        optimizer.step()

    for x, y in zip(on_device[:2] + on_device[-1:], targets[:2] + targets[-1:]):
        train_step(x, y)
    sync()
    started = time.perf_counter()
    for _ in range(args.repeats):
        for x, y in zip(on_device, targets):
            train_step(x, y)
    sync()
    train = args.repeats * n / (time.perf_counter() - started)

    gpu = torch.cuda.get_device_name() if cuda else "no GPU"
    print(f"PyTorch {torch.__version__} ({source} MobileNetV2, {'bfloat16 channels-last' if cuda else 'float32'}"
          f"{', torch.compile' if args.compile else ''}) @ {args.size}px, batch {args.batch}, {n} JPEGs from "
          f"{args.data}, {args.workers} loader workers, {os.cpu_count()} CPUs, {gpu}")
    print(f"decode   {decode:8.1f} img/s")
    print(f"forward  {forward:8.1f} img/s")
    print(f"e2e      {e2e:8.1f} img/s")
    print(f"train    {train:8.1f} img/s")
    print(f"e2e / min(decode, forward) {e2e / min(decode, forward):.2f}")


def _normalize(x):
    """uint8 0..255 NCHW -> float in -1..1, as MobileNetV2 expects (on the device)."""
    return x.float().div_(127.5).sub_(1.0)


class JpegFolder:
    """A map-style dataset: Pillow decode + resize to ``size``, as uint8 CHW tensors."""

    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = list(paths), list(labels), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        import numpy as np
        import torch

        from transferkit.data.decode import load_image

        pixels = load_image(self.paths[index], self.size)  # the decode transferkit uses: RGB, resized
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), int(self.labels[index])


def mobilenet_v2(num_classes: int):
    """torchvision's MobileNetV2, else the same network built here; ``features_and_pool`` added."""
    import torch
    from torch import nn

    try:
        from torchvision.models import mobilenet_v2 as torchvision_mobilenet_v2
        model, source = torchvision_mobilenet_v2(num_classes=num_classes), "torchvision"
    except ImportError:
        model, source = _MobileNetV2(num_classes), "built-in"

    def features_and_pool(x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(model.features(x), 1), 1)

    model.features_and_pool = features_and_pool
    return model, source


def _conv(cin, cout, kernel, stride=1, groups=1, activation=True):
    from torch import nn

    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if activation else nn.Sequential(*layers)


def _inverted_residual_class():
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [_conv(cin, hidden, 1)] if expand != 1 else []
            layers += [_conv(hidden, hidden, 3, stride, groups=hidden), _conv(hidden, cout, 1, activation=False)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    return InvertedResidual


def _MobileNetV2(num_classes):  # noqa: N802 - named after the network
    """MobileNetV2 (width 1.0) with torchvision's layer layout: ``features`` then ``classifier``."""
    import torch
    from torch import nn

    block = _inverted_residual_class()
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [_conv(3, 32, 3, 2)], 32
    for expand, cout, repeats, stride in settings:
        for i in range(repeats):
            layers.append(block(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers.append(_conv(cin, 1280, 1))

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return MobileNetV2()


if __name__ == "__main__":
    main()
