"""Load a model folder and prove it is safe to serve.

Readiness is earned, not assumed: the ONNX bytes must hash to the card's sha256, the graph's
inputs/outputs must match the card, the requested execution provider must really be active, and
every golden sample must be reproduced (preprocessed with ``app.preprocessing``, run through the
same code path as requests) within its tolerance. Any failure leaves the service alive but not
ready, with a reason an operator can act on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import PIL
import PIL.Image

from app.cpu_budget import ThreadPlan, available_cpus, plan_threads
from app.inputs import prepare_image
from app.model_card import CardError, ModelCard, read_card
from app.onnx_model import CUDA, OnnxModel, requested_providers, session_options
from app.preprocessing import ImageError
from app.settings import Settings

logger = logging.getLogger("defect.model")


class ModelCheckError(RuntimeError):
    """A check failed; the message is the not-ready reason."""


@dataclass
class LoadOutcome:
    """What loading produced. ``failure is None`` means ready to serve."""

    model: OnnxModel | None = None
    raw_card: dict[str, Any] | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None
    seconds: float = 0.0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_thread_plan(settings: Settings) -> ThreadPlan:
    """Workers x intra-op threads for these settings on this machine (see ``plan_threads``)."""
    gpu = requested_providers(settings.provider, ort.get_available_providers())[0] == CUDA
    return plan_threads(
        available_cpus(),
        workers=settings.inference_workers,
        intra_op_threads=settings.intra_op_threads,
        gpu=gpu,
    )


def resolve_threads(settings: Settings) -> int:
    """The intra-op thread count the service uses with these settings."""
    return resolve_thread_plan(settings).intra_op_threads


def _static_dims(shape: list[Any]) -> list[int | None]:
    return [dim if isinstance(dim, int) and dim > 0 else None for dim in shape]


def check_graph_io(session: ort.InferenceSession, card: ModelCard) -> dict[str, Any]:
    """The graph must take and give exactly what the card promises."""
    inputs = {item.name: item for item in session.get_inputs()}
    outputs = {item.name: item for item in session.get_outputs()}
    spec = card.input
    graph_input = inputs.get(spec.name)
    if graph_input is None:
        raise ModelCheckError(
            f"graph I/O mismatch: card input {spec.name!r} not in graph inputs {sorted(inputs)}"
        )
    if len(inputs) != 1:
        raise ModelCheckError(f"graph I/O mismatch: expected one input, graph has {sorted(inputs)}")
    if graph_input.type != "tensor(float)":
        raise ModelCheckError(f"graph I/O mismatch: input type {graph_input.type}, card float32")
    expected = [None, spec.height, spec.width, spec.channels]
    actual = _static_dims(list(graph_input.shape))
    if len(actual) != 4 or any(
        want is not None and got is not None and want != got
        for want, got in zip(expected, actual, strict=True)
    ):
        raise ModelCheckError(
            f"graph I/O mismatch: input shape {graph_input.shape}, card [N, {spec.height}, "
            f"{spec.width}, {spec.channels}] (NHWC)"
        )
    if actual[0] is not None:
        raise ModelCheckError(
            f"graph I/O mismatch: batch axis is fixed to {actual[0]}, contract says dynamic"
        )
    for role, name, rank in (
        ("probabilities", card.outputs.probabilities.name, 2),
        ("heatmap", card.outputs.heatmap.name, 3),
    ):
        graph_output = outputs.get(name)
        if graph_output is None:
            raise ModelCheckError(
                f"graph I/O mismatch: card {role} output {name!r} not in graph outputs "
                f"{sorted(outputs)}"
            )
        if len(graph_output.shape) != rank:
            raise ModelCheckError(
                f"graph I/O mismatch: {role} output has shape {graph_output.shape}, "
                f"expected rank {rank}"
            )
    classes = _static_dims(list(outputs[card.outputs.probabilities.name].shape))[1]
    if classes is not None and classes != len(card.class_names):
        raise ModelCheckError(
            f"graph I/O mismatch: probabilities has {classes} classes, card lists "
            f"{len(card.class_names)}"
        )
    return {
        "ok": True,
        "input": {"name": spec.name, "shape": list(graph_input.shape)},
        "outputs": {name: list(item.shape) for name, item in outputs.items()},
    }


def check_embedded_card(session: ort.InferenceSession, card: ModelCard) -> dict[str, Any]:
    """The card inside the ONNX metadata must be from the same export as model_card.json."""
    embedded_text = session.get_modelmeta().custom_metadata_map.get("model_card")
    if not embedded_text:
        return {"ok": True, "present": False}
    try:
        embedded = json.loads(embedded_text)
    except json.JSONDecodeError:
        return {"ok": True, "present": True, "parsable": False}
    for key in ("name", "version"):
        if embedded.get(key) != getattr(card, key):
            raise ModelCheckError(
                f"card mismatch: model.onnx embeds {key}={embedded.get(key)!r} but "
                f"model_card.json says {getattr(card, key)!r} (card and model are from "
                "different exports)"
            )
    return {"ok": True, "present": True}


def check_providers(session: ort.InferenceSession, setting: str) -> dict[str, Any]:
    active = list(session.get_providers())
    result = {
        "ok": True,
        "setting": setting,
        "active": active,
        "available": list(ort.get_available_providers()),
    }
    if setting == "cuda" and CUDA not in active:
        raise ModelCheckError(
            f"provider 'cuda' is required but onnxruntime runs on {active} (available: "
            f"{result['available']}); install onnxruntime-gpu with matching CUDA/cuDNN "
            "libraries and expose a GPU, or set DEFECT_PROVIDER=auto or cpu"
        )
    return result


AUTOTUNE_ROUNDS = 7
AUTOTUNE_TOLERANCE = 0.10


def candidate_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch_size``."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return sizes


def choose_batch_size(images_per_s: dict[int, float], tolerance: float = AUTOTUNE_TOLERANCE) -> int:
    """The smallest batch size within ``tolerance`` of the best throughput.

    Smaller batches cost less latency, and in the service a batch also costs waiting for
    batch-mates and copying them into one buffer, which the model timing does not see, so a
    larger one must pay clearly (10 %). On a CPU, where a convolution already keeps the cores
    busy with one image, this is 1; on a GPU, where a batch fills the device, the largest.
    """
    best = max(images_per_s.values())
    return min(size for size, rate in images_per_s.items() if rate >= (1 - tolerance) * best)


def warm_up(model: OnnxModel, max_batch_size: int, runs: int, autotune: bool) -> dict[str, Any]:
    """First runs allocate arenas and pick kernels; pay that before the first request. With
    ``autotune``, also time each batch size (median of interleaved rounds) and cap batches
    accordingly."""
    spec = model.card.input
    started = time.perf_counter()
    sizes = candidate_batch_sizes(max_batch_size) if autotune else sorted({1, max_batch_size})
    tensor = np.zeros((spec.height, spec.width, spec.channels), np.float32)
    for size in sizes:
        for _ in range(runs):
            model.run_tensors([tensor] * size)
    images_per_s: dict[int, float] = {}
    if autotune and len(sizes) > 1:
        # Rounds interleave the sizes, so a burst of load from elsewhere hits them alike, and
        # the median round counts: one lucky run cannot pick a batch size.
        timings: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(AUTOTUNE_ROUNDS):
            for size in sizes:
                tensors = [tensor] * size
                run_started = time.perf_counter()
                model.run_tensors(tensors)
                timings[size].append(time.perf_counter() - run_started)
        images_per_s = {size: size / statistics.median(timings[size]) for size in sizes}
    effective = choose_batch_size(images_per_s) if images_per_s else max_batch_size
    model.max_batch_size = effective
    return {
        "ok": True,
        "runs": runs,
        "batch_sizes": sizes,
        "images_per_s": {str(size): round(rate, 1) for size, rate in images_per_s.items()},
        "effective_max_batch_size": effective,
        "ms": round((time.perf_counter() - started) * 1000, 1),
    }


def replay_golden_samples(
    model: OnnxModel, model_dir: Path, tolerance_override: float | None
) -> dict[str, Any]:
    """Reproduce every golden sample, one at a time and all in one batch.

    An input hash mismatch with matching outputs is only a warning (a Pillow release may round a
    pixel differently); an output mismatch fails, and the input hash says which side is to blame.
    """
    card = model.card
    if not card.golden_samples:
        return {"ok": True, "count": 0, "note": "the card has no golden samples"}
    spec = card.input_spec
    prepared = []
    results: list[dict[str, Any]] = []
    for sample in card.golden_samples:
        path = model_dir / sample.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelCheckError(f"golden sample {sample.file} cannot be read: {exc}") from exc
        if sample.sha256 and sha256_hex(data) != sample.sha256.lower():
            raise ModelCheckError(f"golden sample {sample.file} does not match its sha256")
        try:
            image = prepare_image(data, spec, max_pixels=2**31)
        except ImageError as exc:
            raise ModelCheckError(f"golden sample {sample.file} cannot be decoded: {exc}") from exc
        prepared.append(image.tensor)
        input_hash = sha256_hex(np.ascontiguousarray(image.tensor).tobytes())
        results.append(
            {
                "file": sample.file,
                "input_sha256_match": (
                    None if sample.input_sha256 is None else input_hash == sample.input_sha256
                ),
            }
        )
    single = [model.run_tensors([tensor])[0] for tensor in prepared]
    batched = model.run_tensors(prepared)
    failures = []
    for sample, result, one, many in zip(
        card.golden_samples, results, single, batched, strict=True
    ):
        tolerance = tolerance_override or sample.tolerance
        expected = np.asarray(sample.probabilities, dtype=np.float64)
        diff = float(np.max(np.abs(one.probabilities.astype(np.float64) - expected)))
        batch_diff = float(np.max(np.abs(many.probabilities.astype(np.float64) - expected)))
        heat_diff = (
            None
            if sample.heatmap_max is None
            else abs(float(one.heatmap.max()) - sample.heatmap_max)
        )
        ok = (
            diff <= tolerance
            and batch_diff <= tolerance
            and (heat_diff is None or heat_diff <= tolerance)
        )
        result.update(
            {
                "ok": ok,
                "expected": sample.probabilities,
                "actual": [float(value) for value in one.probabilities],
                "max_abs_diff": diff,
                "batched_max_abs_diff": batch_diff,
                "heatmap_max_abs_diff": heat_diff,
                "tolerance": tolerance,
            }
        )
        if not ok:
            if result["input_sha256_match"] is False:
                blame = (
                    "the preprocessed input differs from training's (input_sha256 mismatch): "
                    f"preprocessing mismatch, e.g. Pillow {PIL.__version__} here vs "
                    f"{model.raw_card.get('versions', {}).get('pillow', '?')} at training"
                )
            else:
                blame = (
                    "the preprocessed input is identical to training's, so the model file or "
                    f"the runtime (onnxruntime {ort.__version__}, {model.providers[0]}) differs"
                )
            failures.append(
                f"golden sample {sample.file}: probabilities off by "
                f"{max(diff, batch_diff):.2e} (heatmap max off by {heat_diff}) > tolerance "
                f"{tolerance:.0e}; {blame}"
            )
        elif result["input_sha256_match"] is False:
            logger.warning(
                "golden sample input hash differs but outputs agree",
                extra={"fields": {"file": sample.file}},
            )
    if failures:
        raise ModelCheckError("; ".join(failures))
    return {"ok": True, "count": len(results), "samples": results}


def load_model(settings: Settings) -> LoadOutcome:
    """Load and verify the model named by the settings; never raises."""
    started = time.perf_counter()
    outcome = LoadOutcome()
    model_dir = settings.model_dir
    try:
        card, raw_card = read_card(model_dir)
        outcome.raw_card = raw_card
        onnx_path = model_dir / card.onnx.file
        try:
            model_bytes = onnx_path.read_bytes()
        except OSError as exc:
            raise ModelCheckError(f"cannot read the ONNX file {onnx_path}: {exc}") from exc
        digest = sha256_hex(model_bytes)
        if digest != card.onnx.sha256.lower():
            raise ModelCheckError(
                f"sha256 mismatch: {onnx_path.name} hashes to {digest}, the card says "
                f"{card.onnx.sha256} (model and card are out of sync or the file is damaged)"
            )
        outcome.checks["sha256"] = {"ok": True, "sha256": digest}
        plan = resolve_thread_plan(settings)
        providers = requested_providers(settings.provider, ort.get_available_providers())
        try:
            session = ort.InferenceSession(
                model_bytes,
                sess_options=session_options(plan.intra_op_threads, settings.ort_spinning),
                providers=providers,
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelCheckError(f"onnxruntime cannot load {onnx_path.name}: {exc}") from exc
        del model_bytes
        model = OnnxModel(
            session,
            card,
            raw_card,
            digest,
            intra_op_threads=plan.intra_op_threads,
            inference_workers=plan.inference_workers,
            max_batch_size=settings.max_batch_size,
        )
        outcome.model = model
        outcome.checks["providers"] = check_providers(session, settings.provider)
        outcome.checks["graph_io"] = check_graph_io(session, card)
        outcome.checks["embedded_card"] = check_embedded_card(session, card)
        outcome.checks["warmup"] = warm_up(
            model,
            settings.max_batch_size,
            settings.warmup_runs,
            autotune=settings.batch_autotune and settings.batching,
        )
        PIL.Image.init()  # import every decoder plugin now, not during the first odd upload
        outcome.checks["golden_samples"] = replay_golden_samples(
            model, model_dir, settings.golden_tolerance
        )
    except (CardError, ModelCheckError) as exc:
        outcome.failure = str(exc)
    except Exception as exc:  # a broken model file must not take the process down
        logger.exception("model loading failed unexpectedly")
        outcome.failure = f"model loading failed: {type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - started
    return outcome
