"""The ceiling: what decode + preprocess + onnxruntime achieve in-process, with no HTTP at all.

This is the upper bound the service is compared with, so it is built to be as fast as this
hardware allows with the service's own resources:

* the same ONNX file, the same ``SessionOptions`` (``app.onnx_model.session_options``) and the
  same thread plan as the service: intra-op threads per run, parallel model runs (workers),
  decode threads;
* the same decoding and preprocessing code (``app.preprocessing.preprocess_bytes``), with the
  same Pillow block cache the service enables;
* three schedules, and the best one counts: *sequential* (one thread decodes a batch, then runs
  it), *pipelined* (``decode_threads`` threads decode ahead while ``workers`` threads run the
  model: what the service's micro-batcher does) and *parallel* (threads that each decode and
  run their own batches on the shared session: what the service does with batching off), at
  every batch size asked for;
* batches are written into one preallocated input buffer (no per-batch allocation).

It also reports the model alone on pre-decoded tensors (images/s per batch size) and the
single-image latency (decode + preprocess + one run, one image at a time), the figure the
service's p50 at concurrency 1 is held against.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.model_card import ModelCard, read_card
from app.onnx_model import session_options
from app.preprocessing import enable_block_cache, preprocess_bytes
from bench.loadgen import percentiles_ms
from bench.servers import system_busy_seconds


@dataclass
class CeilingModel:
    session: ort.InferenceSession
    card: ModelCard
    input_name: str
    output_names: list[str]
    threads: int

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs: list[np.ndarray] = self.session.run(self.output_names, {self.input_name: batch})
        return outputs


def load_ceiling_model(model_dir: Path, threads: int, spinning: bool = False) -> CeilingModel:
    card, _ = read_card(model_dir)
    session = ort.InferenceSession(
        str(model_dir / card.onnx.file),
        sess_options=session_options(threads, spinning),
        providers=["CPUExecutionProvider"],
    )
    return CeilingModel(
        session,
        card,
        card.input.name,
        [card.outputs.probabilities.name, card.outputs.heatmap.name],
        threads,
    )


SCHEDULES = ("pipelined", "parallel", "sequential")


@dataclass(frozen=True)
class Rate:
    images_per_s: float
    cpu_ms_per_image: float  # this process, all threads


def _timed(function: Callable[[], int]) -> Rate:
    started = time.perf_counter()
    cpu = time.process_time()
    count = function()
    seconds = time.perf_counter() - started
    return Rate(count / seconds, 1000 * (time.process_time() - cpu) / max(count, 1))


class Ceiling:
    """Runs the ceiling measurements for one model on one image list."""

    def __init__(
        self,
        model: CeilingModel,
        images: Sequence[bytes],
        *,
        workers: int,
        decode_threads: int,
        max_batch: int,
    ) -> None:
        self.model = model
        self.images = list(images)
        self.workers = workers
        self.decode_threads = decode_threads
        self.spec = model.card.input_spec
        enable_block_cache(4 * decode_threads)  # as the service does
        shape = (max_batch, self.spec.height, self.spec.width, self.spec.channels)
        self.buffer = np.empty(shape, dtype=np.float32)

    def decode(self, index: int) -> np.ndarray:
        return preprocess_bytes(self.images[index % len(self.images)], self.spec)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        tensor = self.decode(0)
        for size in batch_sizes:
            self.buffer[:size] = tensor
            for _ in range(3):
                self.model.run(self.buffer[:size])

    def sequential(self, batch: int, total: int) -> Rate:
        """One thread: decode ``batch`` images into the buffer, run, repeat. Images/s."""
        buffer = self.buffer

        def loop() -> int:
            done = 0
            while done < total:
                size = min(batch, total - done)
                for slot in range(size):
                    buffer[slot] = self.decode(done + slot)
                self.model.run(buffer[:size])
                done += size
            return done

        return _timed(loop)

    def pipelined(self, batch: int, total: int) -> Rate:
        """``decode_threads`` workers decode ahead while ``workers`` threads run the model on
        batches of the decoded images (the service's micro-batcher). Images/s."""
        shape = self.buffer.shape[1:]
        buffers = [np.empty((batch, *shape), dtype=np.float32) for _ in range(self.workers)]
        window = 2 * batch * self.workers + self.decode_threads  # decoded-ahead images
        lock = threading.Lock()
        pending: deque[Future[np.ndarray]] = deque()
        counters = {"submitted": 0, "taken": 0}

        def loop() -> int:
            with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:

                def top_up() -> None:  # under the lock
                    while len(pending) < window and counters["submitted"] < total:
                        pending.append(pool.submit(self.decode, counters["submitted"]))
                        counters["submitted"] += 1

                def run_batches(worker: int) -> int:
                    buffer = buffers[worker]
                    done = 0
                    while True:
                        with lock:
                            size = min(batch, total - counters["taken"])
                            if size <= 0:
                                return done
                            futures = [pending.popleft() for _ in range(size)]
                            counters["taken"] += size
                            top_up()
                        for slot, future in enumerate(futures):
                            buffer[slot] = future.result()
                        self.model.run(buffer[:size])
                        done += size

                with lock:
                    top_up()
                with ThreadPoolExecutor(self.workers, thread_name_prefix="model") as runners:
                    return sum(runners.map(run_batches, range(self.workers)))

        return _timed(loop)

    def parallel(self, batch: int, total: int) -> Rate:
        """``max(workers, decode_threads)`` threads, each decoding and running its own batches
        on the shared session at the same time (batching off runs the model in the decoding
        thread). Images/s."""
        workers = max(self.workers, self.decode_threads)
        shape = self.buffer.shape[1:]
        buffers = [np.empty((batch, *shape), dtype=np.float32) for _ in range(workers)]

        def work(worker: int) -> int:
            buffer = buffers[worker]
            indexes = list(range(worker, total, workers))
            for start in range(0, len(indexes), batch):
                chunk = indexes[start : start + batch]
                for slot, index in enumerate(chunk):
                    buffer[slot] = self.decode(index)
                self.model.run(buffer[: len(chunk)])
            return len(indexes)

        def loop() -> int:
            with ThreadPoolExecutor(workers, thread_name_prefix="worker") as pool:
                return sum(pool.map(work, range(workers)))

        return _timed(loop)

    def model_only(self, batch: int, total: int) -> Rate:
        """onnxruntime alone on already-decoded tensors, ``workers`` runs side by side (what
        batching and the thread plan can buy the model, without any decoding)."""
        tensors = [self.decode(i) for i in range(min(len(self.images), batch))]
        for slot in range(batch):
            self.buffer[slot] = tensors[slot % len(tensors)]
        buffers = [self.buffer[:batch].copy() for _ in range(self.workers)]
        runs = max(1, total // (batch * self.workers))

        def work(worker: int) -> int:
            for _ in range(runs):
                self.model.run(buffers[worker])
            return runs * batch

        def loop() -> int:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="model") as pool:
                return sum(pool.map(work, range(self.workers)))

        return _timed(loop)

    def single_image_latency(self, total: int) -> dict[str, Any]:
        """Decode + preprocess + one run per image, one at a time: the per-request floor."""
        whole: list[float] = []
        decode: list[float] = []
        run: list[float] = []
        for index in range(total):
            started = time.perf_counter()
            tensor = self.decode(index)
            decoded = time.perf_counter()
            self.model.run(tensor[np.newaxis])
            finished = time.perf_counter()
            whole.append(finished - started)
            decode.append(decoded - started)
            run.append(finished - decoded)
        return {
            "images": total,
            "total_ms": percentiles_ms(whole),
            "decode_preprocess_ms": percentiles_ms(decode),
            "onnxruntime_ms": percentiles_ms(run),
        }


def measure_ceiling(
    model_dir: Path,
    images: Sequence[bytes],
    *,
    threads: int,
    workers: int,
    decode_threads: int,
    batch_sizes: Sequence[int],
    total: int,
    latency_images: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All ceiling figures; ``best`` is the highest images/s of any schedule and batch size."""
    model = load_ceiling_model(model_dir, threads)
    ceiling = Ceiling(
        model, images, workers=workers, decode_threads=decode_threads, max_batch=max(batch_sizes)
    )
    ceiling.warm_up(batch_sizes)
    latency = ceiling.single_image_latency(latency_images)
    log(
        f"  single image: p50 {latency['total_ms']['p50']} ms "
        f"(decode+preprocess {latency['decode_preprocess_ms']['p50']} ms, "
        f"onnxruntime {latency['onnxruntime_ms']['p50']} ms)"
    )
    rows: list[dict[str, float]] = []
    for batch in batch_sizes:
        busy, own, wall = system_busy_seconds(), time.process_time(), time.perf_counter()
        model_only = ceiling.model_only(batch, total)
        sequential = ceiling.sequential(batch, total)
        pipelined = ceiling.pipelined(batch, total)
        parallel = ceiling.parallel(batch, total)
        row: dict[str, float] = {
            "batch_size": batch,
            "model_only": round(model_only.images_per_s, 2),
            "sequential": round(sequential.images_per_s, 2),
            "pipelined": round(pipelined.images_per_s, 2),
            "parallel": round(parallel.images_per_s, 2),
            "model_only_cpu_ms_per_image": round(model_only.cpu_ms_per_image, 3),
            "sequential_cpu_ms_per_image": round(sequential.cpu_ms_per_image, 3),
            "pipelined_cpu_ms_per_image": round(pipelined.cpu_ms_per_image, 3),
            "parallel_cpu_ms_per_image": round(parallel.cpu_ms_per_image, 3),
        }
        other = (system_busy_seconds() - busy) - (time.process_time() - own)
        row["other_cpu_cores"] = round(max(0.0, other) / (time.perf_counter() - wall), 3)
        rows.append(row)
        log(
            f"  batch {batch:>3}: pipelined {row['pipelined']:8.1f} img/s, parallel "
            f"{row['parallel']:8.1f}, sequential "
            f"{row['sequential']:8.1f}, model only {row['model_only']:8.1f} (other processes "
            f"{row['other_cpu_cores']} cores)"
        )
    best_row, best_schedule = max(
        ((row, schedule) for row in rows for schedule in SCHEDULES),
        key=lambda pair: pair[0][pair[1]],
    )
    best: dict[str, Any] = {
        "schedule": best_schedule,
        "batch_size": int(best_row["batch_size"]),
        "throughput": best_row[best_schedule],
        "cpu_ms_per_image": best_row[f"{best_schedule}_cpu_ms_per_image"],
    }
    return {
        "threads": threads,
        "workers": workers,
        "decode_threads": decode_threads,
        "images_per_batch_size": total,
        "providers": list(model.session.get_providers()),
        "by_batch_size": rows,
        "best": best,
        "single_image": latency,
    }


def single_image_latency_now(
    model_dir: Path, images: Sequence[bytes], *, threads: int, total: int
) -> dict[str, Any]:
    """The ceiling's single-image latency measured again (next to the service's c=1 level, so
    the two are compared at the same moment on a machine whose speed drifts)."""
    model = load_ceiling_model(model_dir, threads)
    ceiling = Ceiling(model, images, workers=1, decode_threads=1, max_batch=1)
    ceiling.warm_up([1])
    return ceiling.single_image_latency(total)


def recheck_best(
    model_dir: Path,
    images: Sequence[bytes],
    best: dict[str, Any],
    *,
    threads: int,
    workers: int,
    decode_threads: int,
    total: int,
) -> float:
    """The best configuration measured again (at the end of the run, to expose drift)."""
    model = load_ceiling_model(model_dir, threads)
    batch = int(best["batch_size"])
    ceiling = Ceiling(
        model, images, workers=workers, decode_threads=decode_threads, max_batch=batch
    )
    ceiling.warm_up([batch])
    schedule = getattr(ceiling, str(best["schedule"]))
    rate: Rate = schedule(batch, total)
    return round(rate.images_per_s, 2)
