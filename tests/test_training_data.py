"""Dataset loading: every image mode and format decodes; every bad layout fails clearly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.preprocessing import InputSpec
from training.data import DatasetError, load_dataset

SPEC = InputSpec(width=64, height=32, color_mode="rgb")


def _image(mode: str, size: tuple[int, int] = (90, 40)) -> Image.Image:
    rng = np.random.default_rng(abs(hash(mode)) % 2**32)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


# (mode, file suffix) pairs covering grayscale, colour, alpha, palette, CMYK and 16-bit inputs.
CASES = [
    ("L", ".png"),
    ("LA", ".png"),
    ("P", ".png"),
    ("RGB", ".jpg"),
    ("RGBA", ".png"),
    ("CMYK", ".jpg"),
    ("I;16", ".png"),
    ("RGB", ".bmp"),
    ("RGB", ".tiff"),
    ("L", ".tif"),
    ("CMYK", ".tiff"),
    ("1", ".png"),
]


def _write(folder: Path, name: str, mode: str, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    _image(mode).save(path)
    return path


def _make(root: Path, n: int = 3) -> None:
    for label in ("normal", "defect"):
        for i in range(n):
            _write(root / label, f"{label}_{i}", "RGB", ".png")


@pytest.mark.parametrize(("mode", "suffix"), CASES)
@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
def test_every_mode_and_format_loads(
    tmp_path: Path, mode: str, suffix: str, color_mode: str
) -> None:
    _make(tmp_path)
    _write(tmp_path / "defect", f"odd_{mode.replace(';', '')}", mode, suffix)
    spec = InputSpec(64, 32, color_mode)  # type: ignore[arg-type]
    data = load_dataset(tmp_path, spec)
    assert data.images.shape == (7, 32, 64, spec.channels)
    assert data.images.dtype == np.uint8
    assert data.counts() == {"normal": 3, "defect": 4}
    assert not data.skipped


def test_any_size_is_resized(tmp_path: Path) -> None:
    for label, size in (("normal", (13, 700)), ("defect", (1200, 9))):
        (tmp_path / label).mkdir()
        _image("RGB", size).save(tmp_path / label / "a.png")
    assert load_dataset(tmp_path, SPEC).images.shape == (2, 32, 64, 3)


def test_missing_class_folder(tmp_path: Path) -> None:
    _write(tmp_path / "normal", "a", "RGB", ".png")
    with pytest.raises(DatasetError, match=r"class folder 'defect/' is missing"):
        load_dataset(tmp_path, SPEC)


def test_empty_class_folder(tmp_path: Path) -> None:
    _write(tmp_path / "normal", "a", "RGB", ".png")
    (tmp_path / "defect").mkdir()
    (tmp_path / "defect" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="holds no image files"):
        load_dataset(tmp_path, SPEC)


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope", SPEC)


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _make(tmp_path, n=20)
    (tmp_path / "defect" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    data = load_dataset(tmp_path, SPEC, max_bad_fraction=0.05)
    assert len(data) == 40
    assert [s.path for s in data.skipped] == ["defect/broken.jpg"]


def test_too_many_unreadable_files_fail(tmp_path: Path) -> None:
    _make(tmp_path, n=3)
    for i in range(3):
        (tmp_path / "normal" / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="unreadable"):
        load_dataset(tmp_path, SPEC, max_bad_fraction=0.1)


def test_single_readable_class_fails(tmp_path: Path) -> None:
    _make(tmp_path, n=3)
    for path in (tmp_path / "defect").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DatasetError):
        load_dataset(tmp_path, SPEC, max_bad_fraction=1.0)


def test_custom_class_folder_names(tmp_path: Path) -> None:
    for label in ("ok", "ng"):
        _write(tmp_path / label, "a", "RGB", ".png")
    data = load_dataset(tmp_path, SPEC, ("ok", "ng"))
    assert data.class_names == ["ok", "ng"]


def test_manifest_groups_and_columns(tmp_path: Path) -> None:
    _make(tmp_path, n=2)
    rows = [
        {"file": f"{label}/{label}_{i}.png", "part": f"p{i}", "camera": "A" if i else "B"}
        for label in ("normal", "defect")
        for i in range(2)
    ]
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "part", "camera"])
        writer.writeheader()
        writer.writerows(rows)
    data = load_dataset(tmp_path, SPEC, group_column="part")
    assert sorted(set(data.groups)) == ["p0", "p1"]
    assert sorted(data.columns["camera"]) == ["A", "A", "B", "B"]
    with pytest.raises(DatasetError, match="no 'station' value"):
        load_dataset(tmp_path, SPEC, group_column="station")


def test_group_regex(tmp_path: Path) -> None:
    _make(tmp_path, n=2)
    data = load_dataset(tmp_path, SPEC, group_regex=r"_(\d+)\.png$")
    assert sorted(set(data.groups)) == ["0", "1"]
    with pytest.raises(DatasetError, match="does not match"):
        load_dataset(tmp_path, SPEC, group_regex=r"^zzz")
