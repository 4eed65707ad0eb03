"""The benchmark's fixed image mix and its pre-encoded HTTP requests.

Every run (service, ceiling, baseline) uses the same files in the same order, so the decode cost
per image is the same everywhere: the two capture sizes differ (565x230 vs 770x322 JPEGs), and a
mix drawn from one class or one framing would favour or penalise whoever got the cheaper ones.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "ballscrew-pitting"

# (label, capture) -> how many files of that kind; crop_1 has only 12 normal images in all.
DEFAULT_MIX: dict[tuple[str, str], int] = {
    ("normal", "crop_2"): 20,
    ("normal", "crop_1"): 12,
    ("defect", "crop_2"): 16,
    ("defect", "crop_1"): 16,
}

BOUNDARY = "benchboundary7d3f2a91c4e8"


@dataclass(frozen=True, slots=True)
class BenchImage:
    name: str  # path relative to the data folder
    label: str
    capture: str
    data: bytes


def _spread(items: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """``count`` items evenly spaced through ``items`` (so every location/time is represented)."""
    if count > len(items):
        raise ValueError(f"asked for {count} images, only {len(items)} available")
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def select_images(
    data_dir: Path = DEFAULT_DATA_DIR, mix: dict[tuple[str, str], int] | None = None
) -> list[BenchImage]:
    """The fixed mix from ``manifest.csv``, interleaved so any prefix is mixed too."""
    mix = mix or DEFAULT_MIX
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found: the benchmark needs the development dataset "
            "(../shared/data/ballscrew-pitting relative to the repository); pass --data"
        )
    with manifest.open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["file"])
    strata: list[list[dict[str, str]]] = []
    for (label, capture), count in mix.items():
        pool = [row for row in rows if row["label"] == label and row["capture"] == capture]
        strata.append(_spread(pool, count))
    ordered: list[dict[str, str]] = []
    for index in range(max(len(stratum) for stratum in strata)):
        ordered.extend(stratum[index] for stratum in strata if index < len(stratum))
    return [
        BenchImage(row["file"], row["label"], row["capture"], (data_dir / row["file"]).read_bytes())
        for row in ordered
    ]


def multipart_body(image: BenchImage, field: str = "file") -> bytes:
    """A ``multipart/form-data`` body with one file part (what line software uploads)."""
    filename = Path(image.name).name
    return b"".join(
        [
            f"--{BOUNDARY}\r\n".encode(),
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode(),
            b"Content-Type: image/jpeg\r\n\r\n",
            image.data,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )


def post_request(path: str, host: str, port: int, body: bytes) -> bytes:
    """The complete HTTP/1.1 keep-alive request, encoded once and replayed by the client."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


def get_request(path: str, host: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode("ascii")
