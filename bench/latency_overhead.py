"""Single-image latency: what the HTTP service adds on top of onnxruntime.

Measures, one request at a time on the same image and with the same thread settings:

1. ``raw run``      - ``InferenceSession.run`` on the already preprocessed tensor;
2. ``in-process``   - decode + preprocess (``app.preprocessing``) + ``run``;
3. ``/predict``     - a real ``defect-serve`` process on loopback, measured by a minimal
                      keep-alive ``http.client`` (multipart body built once), and the
                      server's own ``timing.total_ms``.

Prints p50/p90 of each and the overheads. A script, not a test: run it on an idle machine.

    python -m bench.latency_overhead [--image PATH] [--requests 300] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.model_card import read_card
from app.model_loader import resolve_threads
from app.onnx_model import session_options
from app.preprocessing import preprocess_bytes
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "tests" / "fixtures" / "defect_305000_090.jpg"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(name: str, values_ms: list[float]) -> str:
    return (
        f"{name:<34} p50 {percentile(values_ms, 50):7.3f} ms   "
        f"p90 {percentile(values_ms, 90):7.3f} ms   mean {statistics.fmean(values_ms):7.3f} ms"
    )


def time_calls(function: object, count: int, warmup: int = 20) -> list[float]:
    assert callable(function)
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        function()
        timings.append((time.perf_counter() - started) * 1000.0)
    return timings


def multipart(image: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), boundary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(model_dir: Path, port: int, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DEFECT_MODEL_DIR": str(model_dir),
        "DEFECT_LOG_LEVEL": "WARNING",  # no per-request log line in the measurement
        **env_extra,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("server exited during start-up")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                connection.close()
                return process
            connection.close()
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("server not ready within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--model-dir", type=Path, default=Settings().model_dir)
    parser.add_argument("--batching", choices=["true", "false"], default="true")
    args = parser.parse_args()

    settings = Settings(model_dir=args.model_dir)
    threads = resolve_threads(settings)
    card, _ = read_card(args.model_dir)
    session = ort.InferenceSession(
        str(args.model_dir / card.onnx.file),
        sess_options=session_options(threads, settings.ort_spinning),
        providers=["CPUExecutionProvider"],
    )
    data = args.image.read_bytes()
    spec = card.input_spec
    outputs = [card.outputs.probabilities.name, card.outputs.heatmap.name]
    tensor = preprocess_bytes(data, spec)[np.newaxis]

    def raw_run() -> None:
        session.run(outputs, {card.input.name: tensor})

    def in_process() -> None:
        batch = preprocess_bytes(data, spec)[np.newaxis]
        session.run(outputs, {card.input.name: batch})

    print(f"model {card.name} {card.version}, image {args.image.name}, {threads} intra-op threads")
    raw = time_calls(raw_run, args.requests)
    full = time_calls(in_process, args.requests)

    port = free_port()
    server = start_server(args.model_dir, port, {"DEFECT_BATCHING": args.batching})
    try:
        body, boundary = multipart(data, args.image.name)
        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(body)),
        }
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        server_totals: list[float] = []

        def predict() -> None:
            connection.request("POST", "/predict", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise SystemExit(f"/predict answered {response.status}: {payload[:200]!r}")
            server_totals.append(json.loads(payload)["timing"]["total_ms"])

        http_ms = time_calls(predict, args.requests)
        server_ms = server_totals[-args.requests :]
        connection.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()

    print(summary("raw InferenceSession.run", raw))
    print(summary("decode+preprocess+run in-process", full))
    print(summary(f"/predict over HTTP (batching={args.batching})", http_ms))
    print(summary("/predict server-side total_ms", server_ms))
    p50 = percentile(http_ms, 50)
    print(f"overhead p50 vs raw run:            {p50 - percentile(raw, 50):+.3f} ms")
    print(f"overhead p50 vs in-process decode+run: {p50 - percentile(full, 50):+.3f} ms")


if __name__ == "__main__":
    main()
