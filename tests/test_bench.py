"""Smoke tests of the throughput benchmark's pieces (tiny counts; the figures mean nothing here).

The benchmark itself is a script (``python -m bench.throughput``), never a timed test: these
tests only prove its machinery works end to end against real processes on loopback - the image
mix, the raw keep-alive client (including how it counts errors), the ceiling, the naive Keras
server, the ratios/targets and the Markdown/PNG output.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import loadgen
from bench.images import (
    DEFAULT_DATA_DIR,
    DEFAULT_MIX,
    get_request,
    multipart_body,
    post_request,
    select_images,
)
from bench.report import BEGIN, END
from bench.servers import HOST, running_server
from bench.throughput import main

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "ballscrew-pitting"

needs_data = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "manifest.csv").is_file(),
    reason=f"development data not found at {DEFAULT_DATA_DIR}",
)


@needs_data
def test_image_mix_is_fixed_and_covers_both_classes_and_captures() -> None:
    images = select_images()
    assert len(images) == sum(DEFAULT_MIX.values()) == 64
    assert Counter((i.label, i.capture) for i in images) == Counter(DEFAULT_MIX)
    assert len({image.name for image in images}) == 64
    assert [i.name for i in images] == [i.name for i in select_images()]  # deterministic
    assert len({(i.label, i.capture) for i in images[:4]}) == 4  # interleaved: a prefix is mixed
    body = multipart_body(images[0])
    assert images[0].data in body
    assert body.endswith(b"--\r\n")


@needs_data
@pytest.mark.slow
@pytest.mark.integration
def test_client_counts_successes_and_errors_against_a_real_service(tmp_path: Path) -> None:
    images = select_images()[:8]
    env = {"DEFECT_MODEL_DIR": str(MODEL_DIR), "DEFECT_INTRA_OP_THREADS": "1"}
    with running_server("service", "app.main:create_app", env, tmp_path / "log") as server:
        good = [post_request("/predict", HOST, server.port, multipart_body(i)) for i in images]
        not_an_image = post_request(
            "/predict",
            HOST,
            server.port,
            multipart_body(type(images[0])("x.jpg", "normal", "crop_2", b"plain text")),
        )
        health = get_request("/health", HOST, server.port)
        result = loadgen.run(
            lambda: loadgen.run_level(
                HOST,
                server.port,
                [*good, not_an_image],
                concurrency=3,
                total=18,
                max_seconds=30,
                warmup=3,
                health_request=health,
                health_interval=0.005,
            )
        )
        cpu = server.cpu_seconds()
    assert result.completed == 18
    assert result.statuses == {"200": 16, "415": 2}  # every 9th request is not an image
    assert result.errors == 2
    assert result.throughput > 0
    assert result.latency_ms["p50"] is not None
    assert result.latency_ms["p50"] <= result.latency_ms["p99"]  # type: ignore[operator]
    assert result.health is not None
    assert result.health["samples"] >= 1
    assert result.health["failures"] == 0
    assert cpu > 0


@needs_data
@pytest.mark.slow
@pytest.mark.integration
def test_whole_benchmark_runs_with_tiny_counts(tmp_path: Path) -> None:
    """Ceiling, both service modes, the Keras baseline (when TF is installed), report files."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        baseline: list[str] = ["--skip-baseline"]
    else:
        baseline = ["--baseline-calls", "function,call", "--baseline-levels", "1,2"]
    markdown = tmp_path / "benchmark.md"
    markdown.write_text(f"# Kept title\n\n{BEGIN}\nold\n{END}\n\nKept notes.\n")
    out = tmp_path / "results.json"
    code = main(
        [
            "--quick",
            "--threads",
            "1",
            "--workers",
            "1",
            "--decode-threads",
            "1",
            *baseline,
            "--json",
            str(out),
            "--markdown",
            str(markdown),
            "--plot",
            str(tmp_path / "benchmark.png"),
            "--logs-dir",
            str(tmp_path / "logs"),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    ceiling = results["ceiling"]
    assert ceiling["threads"] == 1
    assert ceiling["best"]["throughput"] > 0
    assert ceiling["single_image"]["total_ms"]["p50"] > 0
    for mode in ("batching_on", "batching_off"):
        service = results["service"][mode]
        assert service["intra_op_threads"] == 1  # the settings reached the server
        assert service["inference_workers"] == 1
        assert service["decode_threads"] == 1
        assert service["batching"]["enabled"] is (mode == "batching_on")
        assert [level["concurrency"] for level in service["levels"]] == [1, 4]
        for level in service["levels"]:
            assert level["errors"] == 0
            assert level["ok"] == 16
            assert level["model_runs"] >= 1
            assert level["server_cpu_s"] > 0
        assert service["levels"][-1]["health"]["samples"] >= 1
    assert results["ratios"]["ceiling_images_per_s"] > 0
    assert results["ratios"]["service_on_vs_ceiling"]["1"] > 0
    assert results["targets"]
    if "baseline" in results:
        for call in ("function", "call"):
            levels = results["baseline"]["calls"][call]["levels"]
            assert all(level["errors"] == 0 for level in levels)
        # The baseline serves the same trained model: the same probabilities as the service.
        assert results["parity"]["images"] == 64
        assert results["parity"]["max_abs_diff"] < 1e-3
    text = markdown.read_text()
    assert text.startswith("# Kept title")
    assert text.rstrip().endswith("Kept notes.")
    assert "old" not in text
    assert "### Service" in text
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000


@needs_data
def test_quantization_probe_scores_every_variant(tmp_path: Path) -> None:
    from bench.quantization import VARIANTS
    from bench.quantization import main as quantization_main

    out = tmp_path / "quantization.json"
    assert quantization_main(["--calibration-images", "16", "--runs", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert [row["variant"] for row in variants] == ["fp32 (shipped)", *VARIANTS]
    assert report["validation_images"] > 100
    for row in variants:
        assert 0.5 < row["roc_auc"] <= 1.0
        assert row["ms_p50"] > 0
    for row in variants[1:]:
        assert row["pays"] == (
            row["ms_p50"] < variants[0]["ms_p50"] and row["auc_change"] >= -0.005
        )
