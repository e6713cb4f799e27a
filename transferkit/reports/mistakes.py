"""The worst-mistakes grid: thumbnails of the highest-loss wrong predictions, each with its true class, the
class predicted and that class's probability (fastai's ``plot_top_losses``).

An image file that cannot be read (moved, deleted, corrupt) becomes a grey placeholder tile with the
reason, so the report is written all the same.

Example:
    >>> plot_mistakes([{"path": "cat1.jpg", "true": "cat", "predicted": "dog", "prob_predicted": 0.93}],
    ...               "runs/pets/test_mistakes.png", title="test: worst mistakes")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: At most this many tiles, the highest-loss mistakes first.
MAX_TILES = 16
#: Side of a thumbnail, in pixels.
THUMBNAIL = 96
COLUMNS = 4
PLACEHOLDER_GREY = 200


def plot_mistakes(mistakes: list[dict], path: str | Path, *, title: str = "worst mistakes",
                  max_tiles: int = MAX_TILES) -> None:
    """Write a PNG grid of mistakes, in the order given (highest loss first).

    Args:
        mistakes: rows with ``path``, ``true``, ``predicted`` and ``prob_predicted`` (the rows of
            ``{prefix}_mistakes.csv``).
        path: where the PNG goes (written atomically).
        title: the figure title.
        max_tiles: how many of the mistakes to draw.
    """
    from transferkit.reports.evaluate import new_figure, save_png

    shown = mistakes[:max_tiles]
    columns = max(1, min(COLUMNS, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure = new_figure(figsize=(1.35 * columns + 0.2, 1.65 * rows + 0.4))
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.set_axis_off()
        if index >= len(shown):
            continue
        mistake = shown[index]
        pixels, problem = thumbnail(mistake["path"])
        axes.imshow(pixels)
        if problem:
            axes.text(0.5, 0.5, problem, transform=axes.transAxes, ha="center", va="center", fontsize=6,
                      color="0.25")
        axes.set_title(f"true {_short(mistake['true'])}\npredicted {_short(mistake['predicted'])} "
                       f"({float(mistake['prob_predicted']):.2f})", fontsize=7)
    if not shown:
        figure.text(0.5, 0.5, "no wrong predictions", ha="center", va="center")
    figure.suptitle(f"{title} ({len(shown)} of {len(mistakes)})" if shown else title, fontsize=9)
    save_png(figure, path)


def thumbnail(path: str, size: int = THUMBNAIL) -> tuple[np.ndarray, str | None]:
    """``(size x size x 3 uint8 pixels, None)``, or a grey tile and why the file could not be read."""
    from transferkit.data.decode import load_image

    try:
        return load_image(path, size), None
    except Exception as error:  # any decoder error, as for screening: a report never fails on one image
        problem = "missing file" if not Path(path).exists() else f"unreadable\n({type(error).__name__})"
        return np.full((size, size, 3), PLACEHOLDER_GREY, np.uint8), problem


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"
