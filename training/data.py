"""Discover, decode and cache a folder-per-class image dataset.

Every image goes through ``app.preprocessing`` — the same code the service runs — so the arrays
the model trains on are byte-identical to what it will see in production.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.preprocessing import ImageError, InputSpec, preprocess_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


class DatasetError(ValueError):
    """The dataset folder cannot be used as given; the message says how to fix it."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class Dataset:
    """Decoded images plus everything needed for grouped splits and breakdowns."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N], index into class_names
    files: list[str]  # paths relative to the data root
    groups: np.ndarray  # str [N]; one group never spans both sides of a split
    class_names: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)  # manifest columns per image
    skipped: list[SkippedFile] = field(default_factory=list)
    group_source: str = "file"

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(
            images=self.images[index],
            labels=self.labels[index],
            files=[self.files[i] for i in index],
            groups=self.groups[index],
            class_names=self.class_names,
            columns={k: [v[i] for i in index] for k, v in self.columns.items()},
            skipped=[],
            group_source=self.group_source,
        )


def list_images(root: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """Return ``(relative path, class index)`` for every image file, checking the folder layout."""
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    if len(class_names) != 2:
        raise DatasetError(f"exactly two classes are needed (normal, defect), got {class_names}")
    entries: list[tuple[str, int]] = []
    for index, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DatasetError(
                f"class folder '{name}/' is missing in {root} (sub-folders found: {present}); "
                "use --normal-dir/--defect-dir to name yours"
            )
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DatasetError(
                f"class folder {folder} holds no image files ({sorted(IMAGE_SUFFIXES)})"
            )
        entries.extend((p.relative_to(root).as_posix(), index) for p in files)
    return entries


def read_manifest(root: Path, manifest: Path | None) -> dict[str, dict[str, str]]:
    """Read the optional manifest (a CSV with a ``file`` column relative to the data root)."""
    path = manifest if manifest is not None else root / "manifest.csv"
    if not path.is_file():
        if manifest is not None:
            raise DatasetError(f"manifest {manifest} does not exist")
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "file" not in reader.fieldnames:
            raise DatasetError(f"manifest {path} needs a 'file' column (got {reader.fieldnames})")
        return {row["file"]: row for row in reader}


def assign_groups(
    files: Sequence[str],
    rows: dict[str, dict[str, str]],
    group_column: str | None,
    group_regex: str | None,
) -> tuple[np.ndarray, str]:
    """Group id per file: a manifest column, else a regex over the file name, else the file itself.

    Near-duplicate photos of one spot must share a group, or any evaluation leaks. With neither a
    column nor a regex every file is its own group, and we say so loudly.
    """
    if group_column:
        missing = [f for f in files if f not in rows or not rows[f].get(group_column)]
        if missing:
            raise DatasetError(
                f"{len(missing)} images have no '{group_column}' value in the manifest, "
                f"e.g. {missing[:3]}"
            )
        return np.array([rows[f][group_column] for f in files]), f"manifest column '{group_column}'"
    if group_regex:
        pattern = re.compile(group_regex)
        groups = []
        for f in files:
            match = pattern.search(Path(f).name)
            if match is None:
                raise DatasetError(f"--group-regex {group_regex!r} does not match file name {f}")
            groups.append(match.group(1) if match.groups() else match.group(0))
        return np.array(groups), f"file-name regex {group_regex!r}"
    log.warning(
        "no group column or regex: every image is its own group. If several photos show the same "
        "part or spot, pass --group-column or --group-regex, or the evaluation will be optimistic."
    )
    return np.array(list(files)), "file (no grouping given)"


def _decode_one(path: Path, spec: InputSpec) -> np.ndarray | str:
    try:
        array = preprocess_bytes(path.read_bytes(), spec)
    except (ImageError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    result: np.ndarray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return result


def load_dataset(
    root: Path,
    spec: InputSpec,
    class_names: Sequence[str] = ("normal", "defect"),
    *,
    manifest: Path | None = None,
    group_column: str | None = None,
    group_regex: str | None = None,
    max_bad_fraction: float = 0.05,
    workers: int = 2,
) -> Dataset:
    """Decode every image with the serving preprocessing; skip and report unreadable files."""
    root = root.resolve()
    entries = list_images(root, class_names)
    rows = read_manifest(root, manifest)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = list(pool.map(lambda e: _decode_one(root / e[0], spec), entries))
    kept: list[int] = []
    skipped: list[SkippedFile] = []
    for i, result in enumerate(decoded):
        if isinstance(result, str):
            skipped.append(SkippedFile(entries[i][0], result))
        else:
            kept.append(i)
    for item in skipped:
        log.warning("skipped unreadable image %s (%s)", item.path, item.reason)
    bad_fraction = len(skipped) / len(entries)
    if bad_fraction > max_bad_fraction:
        raise DatasetError(
            f"{len(skipped)} of {len(entries)} images ({bad_fraction:.1%}) are unreadable, above "
            f"--max-bad-fraction {max_bad_fraction:.1%}; first: "
            + "; ".join(f"{s.path} ({s.reason})" for s in skipped[:5])
        )
    files = [entries[i][0] for i in kept]
    labels = np.array([entries[i][1] for i in kept], dtype=np.int64)
    for index, name in enumerate(class_names):
        if not (labels == index).any():
            raise DatasetError(f"class '{name}' has no readable images: two classes are needed")
    groups, group_source = assign_groups(files, rows, group_column, group_regex)
    columns: dict[str, list[str]] = {}
    if rows:
        names = next(iter(rows.values())).keys()
        columns = {c: [rows.get(f, {}).get(c, "") for f in files] for c in names if c != "file"}
    images = np.stack([decoded[i] for i in kept])  # type: ignore[misc]
    return Dataset(
        images=images,
        labels=labels,
        files=files,
        groups=groups,
        class_names=list(class_names),
        columns=columns,
        skipped=skipped,
        group_source=group_source,
    )
