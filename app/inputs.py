"""Turning uploaded bytes into a model input, with timings and one error vocabulary.

This wraps ``app.preprocessing`` (the code training uses) without changing what it computes:
it splits decoding from preprocessing so each can be timed, and converts any failure of a
decoder on hostile bytes into an ``ImageError`` so bad input can never become a 500.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.preprocessing import (
    CorruptImageError,
    ImageError,
    InputSpec,
    UnsupportedImageError,
    decode_image,
    to_model_input,
)

logger = logging.getLogger("defect.inputs")

_BMP_INFO_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def image_signature(data: bytes) -> str | None:
    """The format whose magic bytes start ``data``, if any.

    Lets a broken file that *claims* to be an image (400 corrupt) be told apart from content
    that is no image at all (415), even where Pillow cannot identify either.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if (
        data[:2] == b"BM"
        and len(data) >= 18
        and int.from_bytes(data[14:18], "little") in _BMP_INFO_HEADER_SIZES
    ):
        return "BMP"
    return None


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A model-ready tensor plus what the response needs to know about the original."""

    tensor: np.ndarray  # float32 [H, W, C], exactly what training fed the model
    width: int  # of the EXIF-oriented original
    height: int
    decode_ms: float
    preprocess_ms: float
    image: Image.Image | None  # the oriented original, kept only to draw a heatmap overlay


def prepare_image(
    data: bytes, spec: InputSpec, *, max_pixels: int, keep_image: bool = False
) -> PreparedImage:
    """Decode and preprocess one upload (CPU-bound; call it from a worker thread)."""
    started = time.perf_counter()
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except UnsupportedImageError as exc:
        signature = image_signature(data)
        if signature is None:
            raise
        raise CorruptImageError(
            f"content has a {signature} signature but its header cannot be parsed"
        ) from exc
    except ImageError:
        raise
    except MemoryError as exc:
        raise CorruptImageError("image needs more memory to decode than is available") from exc
    except Exception as exc:  # a decoder failing on hostile bytes is bad input, not a bug
        logger.warning("decoder failed: %s: %s", type(exc).__name__, exc)
        raise CorruptImageError(f"image cannot be decoded: {type(exc).__name__}") from exc
    decoded = time.perf_counter()
    try:
        tensor = to_model_input(image, spec)
    except ImageError:
        raise
    except Exception as exc:  # e.g. a pixel mode Pillow cannot convert to RGB/L
        raise UnsupportedImageError(
            f"image mode {image.mode!r} cannot be converted to {spec.color_mode}: {exc}"
        ) from exc
    done = time.perf_counter()
    width, height = image.size
    return PreparedImage(
        tensor=tensor,
        width=width,
        height=height,
        decode_ms=(decoded - started) * 1000.0,
        preprocess_ms=(done - decoded) * 1000.0,
        image=image if keep_image else None,
    )
