"""Where the service's CPU goes under load: py-spy samples of a real server, summarised.

    .venv/bin/python -m bench.profile_service --concurrency 32 --seconds 8 [--batching off]

Starts the service (as the throughput benchmark does), drives it with the same client at one
concurrency level, and samples it with ``py-spy record`` twice: all on-CPU stacks, then only
stacks holding the GIL (what serialises the Python side). Each sample is put in the first
category found walking from the leaf frame up (onnxruntime, decoding, multipart, HTTP, ...);
the summary prints the share per category and the top leaf functions. Raw collapsed stacks are
kept for flame graphs. py-spy is not a project dependency: install it anywhere
(``pip install py-spy``) and pass ``--py-spy PATH`` if it is not on PATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from app.cpu_budget import available_cpus
from bench import loadgen
from bench.images import multipart_body, post_request, select_images
from bench.servers import HOST, running_server

REPO = Path(__file__).resolve().parents[1]

# (category, substrings of a frame) - checked from the leaf frame towards the root.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime run", ("onnxruntime", "onnx_model.py")),
    ("decode + preprocess (Pillow/NumPy)", ("PIL/", "preprocessing.py", "inputs.py")),
    ("batcher", ("batcher.py",)),
    ("multipart parsing", ("multipart",)),
    ("JSON", ("json/",)),
    ("logging", ("logging/", "logging_config.py")),
    ("metrics", ("prometheus_client", "metrics.py")),
    ("middleware/routing (Starlette/FastAPI)", ("starlette/", "fastapi/", "middleware.py")),
    ("HTTP protocol (uvicorn)", ("uvicorn/",)),
    ("route code (app)", ("app/",)),
    ("thread pool / futures", ("concurrent/futures", "threading.py", "queue.py")),
    ("event loop (asyncio/uvloop)", ("asyncio/", "uvloop")),
)


def categorise(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def summarise(raw: Path, top: int = 15) -> str:
    categories: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        categories[categorise(stack)] += count
        leaves[stack.split(";")[-1]] += count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in categories.most_common()]
    lines.append("  top leaf frames:")
    lines += [f"  {100 * n / total:5.1f} %  {frame}" for frame, n in leaves.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_service", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="per py-spy recording")
    parser.add_argument("--batching", choices=["on", "off"], default="on")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "ballscrew-pitting")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--out", type=Path, default=None, help="folder for the raw stacks")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    images = select_images()
    env = {
        "DEFECT_MODEL_DIR": str(args.model_dir.resolve()),
        "DEFECT_PROVIDER": "cpu",
        "DEFECT_INTRA_OP_THREADS": str(args.threads),
        "DEFECT_DECODE_THREADS": str(args.threads),
        "DEFECT_BATCHING": "true" if args.batching == "on" else "false",
    }
    with running_server("service", "app.main:create_app", env, out / "server.log") as server:
        requests = [post_request("/predict", HOST, server.port, multipart_body(i)) for i in images]
        duration = 2 * args.seconds + 4
        results: list[loadgen.LevelResult] = []
        load = threading.Thread(
            target=lambda: results.append(
                loadgen.run(
                    lambda: loadgen.run_level(
                        HOST,
                        server.port,
                        requests,
                        concurrency=args.concurrency,
                        total=10**7,
                        max_seconds=duration,
                        warmup=2 * args.concurrency,
                    )
                )
            )
        )
        load.start()
        try:
            for name, extra in (("active", []), ("gil", ["--gil"])):
                raw = out / f"{name}.txt"
                subprocess.run(
                    [
                        args.py_spy,
                        "record",
                        "--pid",
                        str(server.pid),
                        "--duration",
                        str(int(args.seconds)),
                        "--format",
                        "raw",
                        "--nolineno",
                        "--rate",
                        "200",
                        "--output",
                        str(raw),
                        *extra,
                    ],
                    check=True,
                    capture_output=True,
                    timeout=args.seconds + 60,
                )
                title = "on-CPU samples" if name == "active" else "samples holding the GIL"
                print(f"{title} (batching {args.batching}, c={args.concurrency}):")
                print(summarise(raw))
        finally:
            load.join(duration + 60)
    if results:
        level = results[0]
        print(
            f"load during profiling: {level.throughput:.1f} img/s, p50 {level.latency_ms['p50']} "
            f"ms, {level.errors} errors (py-spy's sampling slows the server somewhat)"
        )
    print(f"raw stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
