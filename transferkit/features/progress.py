"""The progress line of a feature extraction on stderr."""

from __future__ import annotations

import sys
import time


class ExtractionProgress:
    """'extracting train: 1024/3453 images (30%), 85 img/s, eta 28s' on stderr.

    Rewritten in place on a terminal, otherwise one line per 10%.
    """

    def __init__(self, split: str, total: int, done: int, enabled: bool):
        self.split, self.total, self.done, self.enabled = split, total, done, enabled
        self.start_done, self.start_time = done, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_tenth = done * 10 // total

    def advance(self, images: int) -> None:
        self.done += images
        tenth = self.done * 10 // self.total
        if not self.enabled or not (self.tty or tenth > self.last_tenth):
            return
        self.last_tenth = tenth
        rate = (self.done - self.start_done) / max(time.monotonic() - self.start_time, 1e-6)
        line = (f"extracting {self.split}: {self.done}/{self.total} images "
                f"({self.done / self.total:.0%}), {rate:.0f} img/s, "
                f"eta {(self.total - self.done) / rate:.0f}s")
        end = "\n" if not self.tty or self.done == self.total else ""
        sys.stderr.write(("\r" if self.tty else "") + line + end)
        sys.stderr.flush()
