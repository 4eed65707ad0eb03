"""From the model's per-cell defect map to what an operator can act on.

The heatmap has one calibrated defect probability per cell of the *resized* input. Because the
preprocessing stretches the whole image (no crop, no padding), cell ``(i, j)`` covers the same
fraction of the original image, so cell boxes map to original pixels by simple scaling.

Which cells are "hot" (the defect area): cells whose probability reaches the decision threshold
**and** whose logit lies in the upper half of this image's logit range. The first condition
alone is not enough: the cells' probabilities are calibrated for the whole image, so on a
clearly defective part most cells pass it and the "region" would be the whole photo. The second
keeps the part of the map that stands out, as class-activation-map localisation usually does.
Only an image judged defect has a hot region; since its logit is the mean of the cells' logits,
its hottest cell always passes both conditions.
"""

from __future__ import annotations

import io
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from app.preprocessing import to_color_mode


@dataclass(frozen=True, slots=True)
class Box:
    """Pixel box in the EXIF-oriented original image: ``[x, x + width) x [y, y + height)``."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class HeatmapSummary:
    peak: float  # highest cell probability
    peak_x: int  # centre of the hottest cell, original pixels
    peak_y: int
    box: Box | None  # the hottest connected hot region, None when no cell is hot
    area_fraction: float  # share of the image covered by hot cells


RELATIVE_LEVEL = 0.5  # share of the logit range (min -> max) a hot cell must reach
_EPSILON = 1e-6


def hot_cells(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """Cells at or above the threshold and in the upper half of the map's logit range."""
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heatmap.shape}")
    probabilities = np.clip(heatmap.astype(np.float64), _EPSILON, 1.0 - _EPSILON)
    logits = np.log(probabilities / (1.0 - probabilities))
    low, high = float(logits.min()), float(logits.max())
    span = max(high - low, _EPSILON)  # a flat map: every cell is at the top of its range
    relative = np.where(high - low < _EPSILON, 1.0, (logits - low) / span)
    hot: np.ndarray = (heatmap >= threshold) & (relative >= RELATIVE_LEVEL)
    return hot


def hottest_region(heatmap: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """Mask of the 8-connected region of ``hot`` cells that contains the hottest cell
    (empty when the hottest cell is not hot)."""
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heatmap.shape}")
    region = np.zeros_like(hot, dtype=bool)
    start = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if not hot[start]:
        return region
    rows, cols = heatmap.shape
    region[start] = True
    frontier = deque([start])
    while frontier:
        row, col = frontier.popleft()
        for d_row in (-1, 0, 1):
            for d_col in (-1, 0, 1):
                r, c = row + d_row, col + d_col
                if 0 <= r < rows and 0 <= c < cols and hot[r, c] and not region[r, c]:
                    region[r, c] = True
                    frontier.append((r, c))
    return region


def cells_to_box(mask: np.ndarray, image_width: int, image_height: int) -> Box | None:
    """Bounding box, in original pixels, of the cells set in ``mask``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    grid_rows, grid_cols = mask.shape
    x0 = math.floor(cols[0] * image_width / grid_cols)
    x1 = math.ceil((cols[-1] + 1) * image_width / grid_cols)
    y0 = math.floor(rows[0] * image_height / grid_rows)
    y1 = math.ceil((rows[-1] + 1) * image_height / grid_rows)
    x1, y1 = min(x1, image_width), min(y1, image_height)
    return Box(x=x0, y=y0, width=x1 - x0, height=y1 - y0)


def summarize_heatmap(
    heatmap: np.ndarray,
    threshold: float,
    image_width: int,
    image_height: int,
    *,
    is_defect: bool,
) -> HeatmapSummary:
    """Peak, hottest region (as a box in original pixels) and defect area fraction.

    For an image not judged defect there is no region and the area is 0; the peak still says
    where the model was most suspicious.
    """
    grid_rows, grid_cols = heatmap.shape
    peak_row, peak_col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if is_defect:
        hot = hot_cells(heatmap, threshold)
        box = cells_to_box(hottest_region(heatmap, hot), image_width, image_height)
        area_fraction = float(np.count_nonzero(hot)) / heatmap.size
    else:
        box, area_fraction = None, 0.0
    return HeatmapSummary(
        peak=float(heatmap[peak_row, peak_col]),
        peak_x=min(image_width - 1, int((peak_col + 0.5) * image_width / grid_cols)),
        peak_y=min(image_height - 1, int((peak_row + 0.5) * image_height / grid_rows)),
        box=box,
        area_fraction=area_fraction,
    )


def _colour_lut() -> np.ndarray:
    """256-entry RGB ramp dark blue -> cyan -> yellow -> red (probability 0 -> 1)."""
    anchors = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [255, 40, 0]], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    steps = np.linspace(0.0, 1.0, 256)
    lut = np.stack(
        [np.interp(steps, positions, anchors[:, channel]) for channel in range(3)], axis=1
    )
    return lut.astype(np.uint8)


_LUT = _colour_lut()
_MAX_ALPHA = 0.5


def render_overlay(
    image: Image.Image, heatmap: np.ndarray, box: Box | None, max_side: int
) -> tuple[bytes, int, int]:
    """PNG of the heatmap blended over the oriented original (downscaled to ``max_side``).

    Hotter cells are more opaque, so normal regions stay readable. Returns (png, width, height).
    """
    base = to_color_mode(image, "rgb")
    scale = min(1.0, max_side / max(base.size))
    size = (max(1, round(base.width * scale)), max(1, round(base.height * scale)))
    if size != base.size:
        base = base.resize(size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.clip(heatmap, 0.0, 1.0).astype(np.float32), mode="F")
    heat_values = np.asarray(heat.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    heat_values = np.clip(heat_values, 0.0, 1.0)
    colours = _LUT[np.rint(heat_values * 255).astype(np.uint8)].astype(np.float32)
    alpha = (heat_values * _MAX_ALPHA)[:, :, np.newaxis]
    blended = np.asarray(base, dtype=np.float32) * (1.0 - alpha) + colours * alpha
    overlay = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
    if box is not None:
        draw = ImageDraw.Draw(overlay)
        x0, y0 = box.x * scale, box.y * scale
        x1 = (box.x + box.width) * scale - 1
        y1 = (box.y + box.height) * scale - 1
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=(0, 255, 0), width=2)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue(), size[0], size[1]
