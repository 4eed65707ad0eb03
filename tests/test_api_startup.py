"""Start-up: every check that decides readiness, the thread budget, and the settings.

Broken models are made from a private copy of the shipped one, so each test fails exactly one
check. A service with a broken model must stay alive (health 200) and say why it is not ready.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import AppClientFactory, edit_card
from pydantic import ValidationError

from app.cpu_budget import available_cpus, cgroup_cpu_limit, plan_threads
from app.model_loader import candidate_batch_sizes, choose_batch_size, load_model
from app.settings import Settings

pytestmark = pytest.mark.anyio


def loaded(model_dir: Path, **overrides: Any) -> Any:
    overrides.setdefault("batch_autotune", False)
    return load_model(Settings(model_dir=model_dir, warmup_runs=1, **overrides))


def test_the_shipped_model_passes_every_check(shipped_model_dir: Path) -> None:
    outcome = loaded(shipped_model_dir)
    assert outcome.failure is None, outcome.failure
    assert set(outcome.checks) == {
        "sha256",
        "providers",
        "graph_io",
        "embedded_card",
        "warmup",
        "golden_samples",
    }
    assert outcome.checks["golden_samples"]["count"] >= 1
    assert all(sample["ok"] for sample in outcome.checks["golden_samples"]["samples"])
    assert all(s["input_sha256_match"] for s in outcome.checks["golden_samples"]["samples"])
    assert outcome.checks["providers"]["active"][0] == "CPUExecutionProvider"


def test_missing_model_dir_names_the_setting(tmp_path: Path) -> None:
    outcome = loaded(tmp_path / "nowhere")
    assert outcome.failure is not None
    assert "DEFECT_MODEL_DIR" in outcome.failure


def test_unreadable_card(model_copy: Path) -> None:
    (model_copy / "model_card.json").write_text("{not json")
    outcome = loaded(model_copy)
    assert outcome.failure is not None
    assert "cannot read" in outcome.failure


def test_unknown_schema_version(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card.update(schema_version=99))
    assert "schema_version 99 is not supported" in (loaded(model_copy).failure or "")


def test_card_missing_required_fields(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card.pop("operating_points"))
    assert "operating_points" in (loaded(model_copy).failure or "")


def test_sha256_mismatch(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card["onnx"].update(sha256="0" * 64))
    outcome = loaded(model_copy)
    assert "sha256 mismatch" in (outcome.failure or "")
    assert outcome.raw_card is not None  # /model can still show the card


def test_damaged_onnx_file_with_a_matching_hash(model_copy: Path) -> None:
    garbage = b"this is not an onnx graph"
    (model_copy / "model.onnx").write_bytes(garbage)
    edit_card(
        model_copy, lambda card: card["onnx"].update(sha256=hashlib.sha256(garbage).hexdigest())
    )
    assert "onnxruntime cannot load" in (loaded(model_copy).failure or "")


def test_input_name_mismatch(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card["input"].update(name="pixels"))
    assert "graph I/O mismatch" in (loaded(model_copy).failure or "")


def test_input_size_mismatch(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card["input"].update(height=card["input"]["height"] * 2))
    failure = loaded(model_copy).failure or ""
    assert "graph I/O mismatch" in failure
    assert "input shape" in failure


def test_output_name_mismatch(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card["outputs"]["heatmap"].update(name="cam"))
    assert "heatmap output 'cam'" in (loaded(model_copy).failure or "")


def test_card_from_another_export(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: card.update(version="some-other-export"))
    assert "different exports" in (loaded(model_copy).failure or "")


def _shift_first_golden(card: dict[str, Any], times_tolerance: float) -> None:
    """Move the first golden sample's expected probabilities by a multiple of its tolerance."""
    sample = card["golden_samples"][0]
    by = times_tolerance * sample.get("tolerance", 1e-4)
    sample["probabilities"][0] -= by
    sample["probabilities"][1] += by


def _first_tolerance(model_dir: Path) -> float:
    card = json.loads((model_dir / "model_card.json").read_text())
    return float(card["golden_samples"][0].get("tolerance", 1e-4))


def test_golden_output_mismatch_blames_the_model_when_inputs_agree(model_copy: Path) -> None:
    edit_card(model_copy, lambda card: _shift_first_golden(card, 10))
    failure = loaded(model_copy).failure or ""
    assert "golden sample" in failure
    assert "preprocessed input is identical" in failure


def test_golden_mismatch_blames_preprocessing_when_the_input_hash_differs(
    model_copy: Path,
) -> None:
    def tamper(card: dict[str, Any]) -> None:
        _shift_first_golden(card, 10)
        card["golden_samples"][0]["input_sha256"] = "f" * 64

    edit_card(model_copy, tamper)
    assert "preprocessing mismatch" in (loaded(model_copy).failure or "")


def test_golden_file_changed_on_disk(model_copy: Path) -> None:
    card = json.loads((model_copy / "model_card.json").read_text())
    golden = model_copy / card["golden_samples"][0]["file"]
    golden.write_bytes(golden.read_bytes() + b"\0")
    assert "does not match its sha256" in (loaded(model_copy).failure or "")


def test_golden_tolerance_can_be_widened(model_copy: Path) -> None:
    tolerance = _first_tolerance(model_copy)
    edit_card(model_copy, lambda card: _shift_first_golden(card, 10))
    assert loaded(model_copy, golden_tolerance=100 * tolerance).failure is None


def test_required_cuda_that_is_not_active_is_not_ready(shipped_model_dir: Path) -> None:
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        outcome = loaded(shipped_model_dir, provider="cuda")
    if "CUDAExecutionProvider" in outcome.checks.get("providers", {}).get("active", []):
        pytest.skip("this machine really has CUDA")
    assert outcome.failure is not None
    assert "provider 'cuda' is required" in outcome.failure
    assert "CPUExecutionProvider" in outcome.failure


def test_cpu_provider_is_honoured(shipped_model_dir: Path) -> None:
    outcome = loaded(shipped_model_dir, provider="cpu")
    assert outcome.failure is None
    assert outcome.model is not None
    assert outcome.model.providers == ["CPUExecutionProvider"]


async def test_a_broken_model_leaves_a_live_service_that_says_why(
    app_client: AppClientFactory, model_copy: Path
) -> None:
    edit_card(model_copy, lambda card: card["onnx"].update(sha256="0" * 64))
    async with app_client(model_dir=model_copy) as client:
        health = await client.get("/health")
        assert health.status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert error["code"] == "not_ready"
        assert "sha256 mismatch" in error["message"]
        assert error["details"] == {"status": "failed"}
        assert "Retry-After" not in ready.headers  # waiting will not fix it
        model = await client.get("/model")
        assert model.status_code == 200
        assert model.json()["status"] == "failed"
        assert model.json()["card"]["onnx"]["sha256"] == "0" * 64
        predict = await client.post("/predict", files={"file": ("a.png", b"x", "image/png")})
        assert predict.status_code == 503
        assert predict.json()["error"]["code"] == "not_ready"
        metrics = (await client.get("/metrics")).text
        assert "defect_model_ready 0.0" in metrics


async def test_missing_model_gives_503_on_model_endpoint(
    app_client: AppClientFactory, tmp_path: Path
) -> None:
    async with app_client(model_dir=tmp_path / "absent") as client:
        assert (await client.get("/health")).status_code == 200
        response = await client.get("/model")
        assert response.status_code == 503
        assert "does not exist" in response.json()["error"]["message"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
async def test_required_cuda_service_reports_why_and_the_real_provider(
    app_client: AppClientFactory,
) -> None:
    async with app_client(provider="cuda") as client:
        model = (await client.get("/model")).json()
        if "CUDAExecutionProvider" in model["providers"]:
            pytest.skip("this machine really has CUDA")
        ready = await client.get("/ready")
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 503
    assert "provider 'cuda' is required" in ready.json()["error"]["message"]
    assert model["provider_setting"] == "cuda"
    assert model["providers"] == ["CPUExecutionProvider"]
    assert 'provider="CPUExecutionProvider"' in metrics  # the fallback is visible to monitoring
    assert "defect_model_ready 0.0" in metrics


async def test_default_thread_budget_follows_available_cpus(app_client: AppClientFactory) -> None:
    async with app_client() as client:
        model = (await client.get("/model")).json()
    cpus = available_cpus()
    assert model["inference_workers"] == cpus  # one single-threaded run per CPU
    assert model["intra_op_threads"] == 1
    assert model["decode_threads"] == cpus


async def test_explicit_thread_budget(app_client: AppClientFactory) -> None:
    async with app_client(intra_op_threads=2, decode_threads=3) as client:
        model = (await client.get("/model")).json()
    assert model["intra_op_threads"] == 2
    assert model["inference_workers"] == max(1, available_cpus() // 2)
    assert model["decode_threads"] == 3
    async with app_client(inference_workers=3) as client:
        model = (await client.get("/model")).json()
    assert model["inference_workers"] == 3
    assert model["intra_op_threads"] == max(1, available_cpus() // 3)


async def test_batch_size_autotune_caps_batches(app_client: AppClientFactory) -> None:
    async with app_client(batch_autotune=True, max_batch_size=4, warmup_runs=1) as client:
        model = (await client.get("/model")).json()
    warmup = model["checks"]["warmup"]
    assert warmup["batch_sizes"] == [1, 2, 4]
    assert set(warmup["images_per_s"]) == {"1", "2", "4"}
    assert all(rate > 0 for rate in warmup["images_per_s"].values())
    chosen = warmup["effective_max_batch_size"]
    assert chosen in (1, 2, 4)
    assert model["batching"]["effective_max_batch_size"] == chosen
    rates = {int(size): rate for size, rate in warmup["images_per_s"].items()}
    assert rates[chosen] >= 0.95 * max(rates.values()) - 0.1  # (rates are rounded)


async def test_autotune_off_keeps_the_configured_batch_size(app_client: AppClientFactory) -> None:
    async with app_client(batch_autotune=False, max_batch_size=6) as client:
        model = (await client.get("/model")).json()
    assert model["batching"]["effective_max_batch_size"] == 6
    assert model["checks"]["warmup"]["images_per_s"] == {}


def test_choose_batch_size_prefers_the_smallest_that_is_nearly_as_fast() -> None:
    assert choose_batch_size({1: 80.0, 2: 79.0, 4: 78.0, 8: 70.0}) == 1  # a busy CPU
    assert choose_batch_size({1: 100.0, 2: 190.0, 4: 350.0, 8: 600.0}) == 8  # a GPU
    assert choose_batch_size({1: 100.0, 2: 150.0, 4: 154.0, 8: 155.0}) == 2
    assert choose_batch_size({1: 100.0, 2: 108.0, 4: 96.0}) == 1  # 8 % does not pay for waiting


def test_candidate_batch_sizes() -> None:
    assert candidate_batch_sizes(1) == [1]
    assert candidate_batch_sizes(8) == [1, 2, 4, 8]
    assert candidate_batch_sizes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize(
    ("cpus", "workers", "intra", "gpu", "expected"),
    [
        (2, 0, 0, False, (2, 1)),  # CPU: one single-threaded run per CPU
        (8, 0, 0, False, (8, 1)),
        (8, 0, 4, False, (2, 4)),  # intra-op threads given: workers fill the rest
        (8, 2, 0, False, (2, 4)),  # workers given: threads split between them
        (8, 3, 0, False, (3, 2)),
        (2, 0, 0, True, (1, 2)),  # GPU: one worker feeds the device
        (1, 4, 4, False, (4, 4)),  # explicit values are kept as given
    ],
)
def test_thread_plan(
    cpus: int, workers: int, intra: int, gpu: bool, expected: tuple[int, int]
) -> None:
    plan = plan_threads(cpus, workers=workers, intra_op_threads=intra, gpu=gpu)
    assert (plan.inference_workers, plan.intra_op_threads) == expected


# --- CPU budget -------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "ctr" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(1.5)
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == min(
        2, len(os.sched_getaffinity(0))
    )


def test_cgroup_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/a/b\n")
    write(tmp_path / "cg" / "a" / "b" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "a" / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(0.5)
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == 1


def test_cgroup_v2_inside_a_container_namespace(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "100000 100000\n")
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    write(tmp_path / "proc", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    base = tmp_path / "cg" / "cpu,cpuacct" / "docker" / "abc"
    write(base / "cpu.cfs_quota_us", "100000\n")
    write(base / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") == pytest.approx(1.0)


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    write(tmp_path / "proc", "3:cpu:/\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc") is None
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == len(os.sched_getaffinity(0))


def test_no_cgroup_information_means_affinity(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none-proc") is None
    assert available_cpus(tmp_path / "none", tmp_path / "none-proc") == len(os.sched_getaffinity(0))


# --- settings ---------------------------------------------------------------------------------


def test_settings_come_from_defect_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEFECT_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("DEFECT_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("DEFECT_BATCHING", "false")
    monkeypatch.setenv("DEFECT_LOG_LEVEL", "debug")
    monkeypatch.setenv("DEFECT_INTRA_OP_THREADS", "")  # empty = unset (compose passes these)
    settings = Settings()
    assert settings.model_dir == tmp_path
    assert settings.max_batch_size == 4
    assert settings.batching is False
    assert settings.log_level == "DEBUG"
    assert settings.intra_op_threads == 0


def test_default_model_dir_is_the_shipped_model(
    monkeypatch: pytest.MonkeyPatch, shipped_model_dir: Path
) -> None:
    monkeypatch.delenv("DEFECT_MODEL_DIR", raising=False)
    assert Settings().model_dir.resolve() == shipped_model_dir.resolve()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEFECT_PROVIDER", "tpu"),
        ("DEFECT_MAX_BATCH_SIZE", "0"),
        ("DEFECT_MAX_BODY_BYTES", "10"),
        ("DEFECT_MAX_BATCH_WAIT_MS", "-1"),
    ],
)
def test_invalid_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_batch_file_limit_must_fit_the_queue() -> None:
    with pytest.raises(ValidationError, match="max_batch_files"):
        Settings(max_batch_files=10, max_queue=5)
