"""Pillow decoding and resizing: image files and pixel arrays in, square uint8 RGB pixels out.

:func:`load_image` and :func:`load_images` decode any mode to RGB (EXIF orientation applied), :func:`resize`
is the one resize of transferkit, and :func:`file_problem` keeps anything but a regular file from being
opened. :mod:`transferkit.data.pipelines` batches the pixels for Keras; nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transferkit.errors import DataError


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode an image file with Pillow into RGB pixels.

    Any mode becomes RGB: grayscale and palette images are replicated, transparency is composited
    onto white, 16/32-bit and float images are scaled to 0..255 (see :func:`_to_rgb`). The EXIF
    orientation is applied; the image is resized to a square with bilinear filtering (aspect ratio
    not kept, like ``keras.utils.image_dataset_from_directory``).

    Args:
        path: the image file.
        image_size: side of the square output.

    Returns:
        uint8 array of shape ``(image_size, image_size, 3)``.
    """
    return resize(_open_rgb(path, draft_size=image_size), image_size)


def load_images(paths, image_size: int, workers: int | None = None) -> np.ndarray:
    """Decode many images in a thread pool (Pillow releases the GIL).

    Args:
        paths: image files.
        image_size: side of the square output.
        workers: threads; None: one per CPU core (Pillow holds the GIL for part of each image,
            so more threads than cores only contend for it).

    Returns:
        uint8 array of shape ``(len(paths), image_size, image_size, 3)``.
    """
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        images = list(pool.map(lambda p: load_image(p, image_size), paths))
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)


def resize(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize to a ``size`` x ``size`` square with Pillow's bilinear filter (aspect ratio not kept).

    The one resize of transferkit: files (:func:`load_image`), pixel arrays given to
    :class:`~transferkit.features.transformer.FeatureExtractor` and :mod:`transferkit.features.measure` all go through it.

    Args:
        image: a Pillow image, or pixels ``[height, width, channels]``: uint8 (resized as a Pillow
            image) or any other number type (each channel resized as 32-bit floats, so values are
            neither rounded nor clipped).
        size: side of the square output.

    Returns:
        ``[size, size, channels]``: uint8 from a Pillow image or uint8 pixels, else float32.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            planes = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)) for c in range(image.shape[-1])]
            return np.stack([resize(plane, size) for plane in planes], axis=-1)
        image = Image.fromarray(image)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """:func:`resize` of each of ``images`` (``[n, height, width, channels]``); unchanged (not copied)
    when they are ``size`` x ``size`` already."""
    if images.shape[1:3] == (size, size):
        return images
    if not len(images):
        return np.zeros((0, size, size, *images.shape[3:]), images.dtype if images.dtype == np.uint8 else np.float32)
    return np.stack([resize(image, size) for image in images])


def _open_rgb(path: str | Path, draft_size: int) -> Image.Image:
    """Open, fully decode and orient an image, as RGB.

    ``draft_size`` lets JPEG decoding shrink by up to 8x while staying at least that large. Anything
    but a regular file (a FIFO would block) raises :class:`~transferkit.errors.DataError` unopened.
    """
    if problem := file_problem(str(path)):
        raise DataError(f"cannot decode {path}: {problem}")
    with Image.open(path) as image:
        image.draft(image.mode, (draft_size, draft_size))  # no-op for other formats than JPEG
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels become white."""
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map high bit-depth pixels linearly from their value range to 0..255 (no saturation)."""
    low, high = _value_range(pixels, mode)
    return np.round((pixels.astype(np.float64) - low) * (255 / (high - low))).clip(0, 255).astype(np.uint8)


def _value_range(pixels: np.ndarray, mode: str) -> tuple[float, float]:
    """The type's range for 16-bit modes (0..65535).

    For ``I`` (32-bit integers, which Pillow also uses for some 16-bit files) and ``F`` (float):
    the smallest of 0..1 (float only), 0..255 and 0..65535 that holds the values, else the image's
    own minimum..maximum.
    """
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = float(pixels.min()), float(pixels.max())
    for limit in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if low >= 0 and high <= limit:
            return 0.0, limit
    return low, max(high, low + 1)


# --------------------------------------------------------------------------------------------
# Files that can be opened, and decoded
# --------------------------------------------------------------------------------------------

_SPECIAL_FILES = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def not_regular(info: os.stat_result) -> str | None:
    """``"not a regular file (FIFO)"`` and the like, or None for a regular file."""
    if stat.S_ISREG(info.st_mode):
        return None
    kind = next((name for is_kind, name in _SPECIAL_FILES if is_kind(info.st_mode)), "special file")
    return f"not a regular file ({kind})"


def file_problem(path: str) -> str | None:
    """Why ``path`` (links followed) cannot be opened safely, or None for a regular file."""
    try:
        return not_regular(os.stat(path))
    except OSError as err:
        return f"unreadable: {err.strerror}"


def decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be decoded into an RGB image, or None if it can."""
    if problem := file_problem(path):
        return problem
    try:
        _open_rgb(path, draft_size=1)  # draft: JPEGs decode at 1/8 scale but still read every byte
    except Image.UnidentifiedImageError:
        return "not an image"
    except OSError as err:
        return "truncated image" if "truncated" in str(err) else f"unreadable: {err}"
    except Exception as err:  # a broken header, EXIF block or palette: any decoder error
        return f"unreadable: {type(err).__name__}: {err}"
    return None
