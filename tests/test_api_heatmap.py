"""Heatmap post-processing: hottest region, box in original pixels, area fraction, overlay."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.heatmap import (
    Box,
    cells_to_box,
    hot_cells,
    hottest_region,
    render_overlay,
    summarize_heatmap,
)


def grid(rows: int = 10, cols: int = 24, base: float = 0.1) -> np.ndarray:
    return np.full((rows, cols), base, dtype=np.float32)


def test_no_region_unless_the_verdict_is_defect() -> None:
    heat = grid()
    heat[3, 4] = 0.9
    summary = summarize_heatmap(heat, 0.5, 565, 230, is_defect=False)
    assert summary.box is None
    assert summary.area_fraction == 0.0
    assert summary.peak == pytest.approx(0.9)  # the peak is still reported


def test_hot_cells_need_the_threshold_and_the_upper_half_of_the_logit_range() -> None:
    heat = grid(rows=1, cols=5)
    heat[0] = [0.02, 0.6, 0.97, 0.999, 0.3]  # logits -3.9, 0.4, 3.5, 6.9, -0.8
    hot = hot_cells(heat, threshold=0.5)
    # 0.6 passes the threshold but sits low in this map's range; 0.97 is above the middle (1.5)
    assert hot[0].tolist() == [False, False, True, True, False]


def test_a_broad_map_is_narrowed_to_what_stands_out() -> None:
    heat = np.full((10, 24), 0.8, dtype=np.float32)  # everything above the threshold ...
    heat[2:4, 6:9] = 0.999  # ... but this patch stands out
    summary = summarize_heatmap(heat, 0.5, 2400, 1000, is_defect=True)
    assert summary.box == Box(x=600, y=200, width=300, height=200)
    assert summary.area_fraction == pytest.approx(6 / 240)


def test_a_flat_map_is_all_hot() -> None:
    heat = np.full((2, 3), 0.9, dtype=np.float32)
    assert hot_cells(heat, 0.5).all()
    assert not hot_cells(np.full((2, 3), 0.4, dtype=np.float32), 0.5).any()


def test_region_is_the_connected_component_of_the_hottest_cell() -> None:
    heat = grid()
    heat[1, 1] = heat[1, 2] = heat[2, 2] = 0.97  # another hot blob
    heat[6, 20] = 0.995  # the hottest cell ...
    heat[7, 21] = 0.98  # ... and a diagonal neighbour (8-connectivity)
    region = hottest_region(heat, hot_cells(heat, 0.5))
    assert sorted(zip(*np.nonzero(region), strict=True)) == [(6, 20), (7, 21)]
    summary = summarize_heatmap(heat, 0.5, 240, 100, is_defect=True)
    assert summary.area_fraction == pytest.approx(5 / 240)  # both blobs count as area


def test_threshold_is_inclusive() -> None:
    heat = grid(rows=2, cols=2)
    heat[0, 1] = 0.5
    assert hot_cells(heat, 0.5)[0, 1]


def test_region_is_empty_when_the_hottest_cell_is_not_hot() -> None:
    heat = grid()
    heat[0, 0] = 0.4
    assert not hottest_region(heat, hot_cells(heat, 0.5)).any()


def test_cell_boxes_map_to_original_pixels() -> None:
    mask = np.zeros((10, 24), dtype=bool)
    mask[0, 0] = True
    assert cells_to_box(mask, 565, 230) == Box(x=0, y=0, width=24, height=23)
    mask[:] = False
    mask[9, 23] = True  # last cell: clipped to the image edge
    box = cells_to_box(mask, 565, 230)
    assert box is not None
    assert box.x + box.width == 565
    assert box.y + box.height == 230
    assert box.x == 541  # floor(23 * 565 / 24)
    assert box.y == 207  # floor(9 * 230 / 10)


def test_full_grid_covers_the_whole_image() -> None:
    assert cells_to_box(np.ones((10, 24), bool), 770, 322) == Box(0, 0, 770, 322)


def test_box_follows_image_size_not_model_size() -> None:
    mask = np.zeros((10, 24), dtype=bool)
    mask[2:4, 6:9] = True  # rows 2-3, cols 6-8
    box = cells_to_box(mask, 2400, 1000)  # 100 px per cell both ways
    assert box == Box(x=600, y=200, width=300, height=200)


def test_peak_is_the_centre_of_the_hottest_cell() -> None:
    heat = grid()
    heat[2, 6] = 0.99
    summary = summarize_heatmap(heat, 0.5, 2400, 1000, is_defect=True)
    assert (summary.peak_x, summary.peak_y) == (650, 250)
    assert summary.box == Box(x=600, y=200, width=100, height=100)


def test_rejects_a_non_2d_heatmap() -> None:
    with pytest.raises(ValueError, match="2-D"):
        hot_cells(np.zeros((2, 3, 4), np.float32), 0.5)


def test_a_defect_verdict_always_has_a_region() -> None:
    """The image logit is the mean of the cell logits, so p_image >= t implies max cell >= t,
    and the hottest cell is at the top of the range by definition."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        logits = rng.normal(rng.normal(0, 2), rng.uniform(0.1, 3), size=(10, 24))
        cells = 1 / (1 + np.exp(-logits))
        image_probability = 1 / (1 + np.exp(-logits.mean()))
        threshold = rng.uniform(0.01, 0.99)
        if image_probability >= threshold:
            summary = summarize_heatmap(cells, threshold, 565, 230, is_defect=True)
            assert summary.box is not None
            assert 0 < summary.area_fraction <= 1


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_overlay_is_a_png_of_the_original_size_with_hot_areas_tinted() -> None:
    original = Image.new("RGB", (240, 100), (128, 128, 128))
    heat = np.zeros((10, 24), np.float32)
    heat[0:3, 0:3] = 1.0
    png, width, height = render_overlay(original, heat, None, max_side=1024)
    overlay = decode_png(png)
    assert overlay.size == (width, height) == (240, 100)
    hot = overlay.getpixel((5, 5))
    cold = overlay.getpixel((200, 80))
    assert isinstance(hot, tuple)
    assert isinstance(cold, tuple)
    assert hot[0] - hot[2] > 100  # tinted red
    assert hot[0] > 180
    assert abs(cold[0] - cold[2]) < 70  # barely tinted grey


def test_overlay_is_downscaled_to_max_side_and_draws_the_box() -> None:
    original = Image.new("L", (2000, 500), 255)
    heat = np.zeros((10, 24), np.float32)
    box = Box(x=1000, y=100, width=400, height=200)
    png, width, height = render_overlay(original, heat, box, max_side=500)
    overlay = decode_png(png)
    assert (width, height) == (500, 125)
    assert overlay.getpixel((250, 25)) == (0, 255, 0)  # top-left corner of the scaled box
    assert overlay.getpixel((10, 10)) != (0, 255, 0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK", "P"])
def test_overlay_accepts_any_image_mode(mode: str) -> None:
    original = Image.new(mode, (60, 30))
    png, width, height = render_overlay(original, np.full((2, 4), 0.5, np.float32), None, 1024)
    assert decode_png(png).size == (width, height) == (60, 30)
