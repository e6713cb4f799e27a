"""One process's part of every global batch in a multi-process run (see :mod:`transferkit.training.multihost`).

The recipe's ``data.batch_size`` is the global batch: every process plans the same batches (the same
seeded order) and decodes only its own consecutive share of each, which Keras puts together into one
global batch over the devices of all processes.

Example:
    >>> Shard(index=1, count=2, devices=2).take([7, 3, 9, 4, 1])   # 5 images: 2 per device, 1 left out
    [9, 4]
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count``; ``devices`` is the number of devices of all processes together
    (the same number on each process).

    A global batch of ``s`` images is cut to a multiple of ``devices``, so that every device gets as
    many: its last ``s % devices`` images are left out, and a batch with fewer images than devices
    is left out whole.
    """
    index: int
    count: int
    devices: int

    def take(self, indices):
        """This process's share of the global batch ``indices`` (any sequence of image indices)."""
        share = len(indices) // self.devices * (self.devices // self.count)
        return indices[self.index * share:(self.index + 1) * share]

    def batches(self, count: int, batch_size: int) -> int:
        """Global batches of ``batch_size`` in an epoch of ``count`` images, less those left out whole."""
        full, rest = divmod(count, batch_size)
        return (full if batch_size >= self.devices else 0) + (rest >= self.devices)

    def used(self, count: int, batch_size: int) -> int:
        """Images of an epoch of ``count`` that the batches use."""
        full, rest = divmod(count, batch_size)
        return full * (batch_size - batch_size % self.devices) + rest - rest % self.devices
