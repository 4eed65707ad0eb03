"""The real container, started the way an operator starts it: `docker compose up --wait`.

Why: the image, the compose file and the service only prove themselves together. The stack is
built and started once for this module under a unique compose project name, on a free port
published on 127.0.0.1, and always torn down (containers, network and the test's image tag).
Only a missing Docker engine skips these tests; any other failure fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.build.yml"]
MODEL_DIR = REPO / "models" / "ballscrew-pitting"
DATASET = REPO.parent / "shared" / "data" / "ballscrew-pitting"
BUILD_AND_START_TIMEOUT_S = 900
# Variables the compose file reads; the developer's own values must not leak into the test.
COMPOSE_VARIABLES = ("BIND_ADDRESS", "HOST_PORT", "GPU_HOST_PORT", "IMAGE_TAG", "DATA_DIR")


def _engine_unreachable_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no Docker engine: docker CLI not installed (../shared/tools/container-engine.sh)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "no Docker engine: `docker info` did not answer within 30 s"
    if info.returncode != 0:
        return f"no Docker engine reachable: {(info.stderr or info.stdout).strip()[:300]}"
    return None


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Stack:
    project: str
    base_url: str
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "compose", "-p", self.project, *COMPOSE_FILES, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", "api", *command, timeout=60)

    def diagnostics(self) -> str:
        ps = self.compose("ps", "--all")
        logs = self.compose("logs", "--no-color", "--tail", "80", "api")
        return (
            f"--- compose ps ---\n{ps.stdout}{ps.stderr}\n"
            f"--- api logs ---\n{logs.stdout}{logs.stderr}"
        )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    reason = _engine_unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.fail("a Docker engine answers but the `docker compose` v2 plugin is missing")

    project = f"defect-test-{uuid.uuid4().hex[:10]}"
    port = _free_loopback_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEFECT_", "COMPOSE_")) and key not in COMPOSE_VARIABLES
    }
    env.update(HOST_PORT=str(port), IMAGE_TAG=project)
    stack = Stack(project=project, base_url=f"http://127.0.0.1:{port}", env=env)
    try:
        started = time.monotonic()
        up = stack.compose(
            "up", "--detach", "--build", "--wait", "--wait-timeout", "300", "api",
            timeout=BUILD_AND_START_TIMEOUT_S,
        )  # fmt: skip
        if up.returncode != 0:
            pytest.fail(
                f"docker compose up --build --wait failed ({up.returncode}):\n"
                f"{up.stdout[-4000:]}\n{up.stderr[-4000:]}\n{stack.diagnostics()}"
            )
        print(f"compose stack {project} built and healthy in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        stack.compose(
            "down", "--volumes", "--remove-orphans", "--rmi", "all", "--timeout", "10",
            timeout=180,
        )  # fmt: skip


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    card: dict[str, Any] = json.loads((MODEL_DIR / "model_card.json").read_text())
    return card


def _dataset_images() -> list[Path]:
    """Real part photos: the repo's fixtures, else the development dataset beside the repo."""
    fixtures = sorted(
        p
        for p in (REPO / "tests" / "fixtures").rglob("*")
        if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    )
    if fixtures:
        return fixtures
    return sorted(DATASET.glob("defect/*.jpg"))[:1] + sorted(DATASET.glob("normal/*.jpg"))[:1]


def test_health_and_ready_through_the_published_port(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200, health.text
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text


def test_predict_a_real_image(client: httpx.Client, card: dict[str, Any]) -> None:
    images = _dataset_images()
    assert images, "no real image found in tests/fixtures or the development dataset"
    for image in images:
        response = client.post("/predict", files={"file": (image.name, image.read_bytes())})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["sha256"] == card["onnx"]["sha256"]
        assert body["operating_point"] == card["default_operating_point"]
        assert set(body["probabilities"]) == set(card["class_names"])
        is_defect = body["defect_probability"] >= body["threshold"]
        (other,) = (name for name in card["class_names"] if name != card["defect_class"])
        assert body["label"] == (card["defect_class"] if is_defect else other), body
        assert body["image"]["width"] > 0
        assert body["image"]["height"] > 0


def test_golden_samples_give_the_cards_probabilities(
    client: httpx.Client, card: dict[str, Any]
) -> None:
    """Same decoding, preprocessing and model in the container as at export, to the tolerance."""
    for golden in card["golden_samples"]:
        data = (MODEL_DIR / golden["file"]).read_bytes()
        response = client.post("/predict", files={"file": (Path(golden["file"]).name, data)})
        assert response.status_code == 200, response.text
        got = response.json()["probabilities"]
        for name, expected in zip(card["class_names"], golden["probabilities"], strict=True):
            assert abs(got[name] - expected) <= golden["tolerance"], (golden["file"], name)


def test_bad_input_gets_the_error_schema_not_a_500(client: httpx.Client) -> None:
    response = client.post("/predict", files={"file": ("notes.txt", b"not an image at all")})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"]


def test_runs_as_non_root(stack: Stack) -> None:
    uid = stack.exec("id", "-u")
    assert uid.returncode == 0, uid.stderr
    assert uid.stdout.strip() != "0"
    image = f"defect-inspection:{stack.project}"
    user = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Config.User}}", image],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert user.returncode == 0, user.stderr
    assert user.stdout.strip().split(":")[0] not in {"", "0", "root"}


def test_image_cannot_import_tensorflow(stack: Stack) -> None:
    runtime = stack.exec("python", "-c", "import onnxruntime, app.main")
    assert runtime.returncode == 0, runtime.stderr
    for module in ("tensorflow", "keras", "tf2onnx"):
        result = stack.exec("python", "-c", f"import {module}")
        assert result.returncode != 0, f"{module} is importable in the serving image"
        assert "ModuleNotFoundError" in result.stderr


def test_root_filesystem_is_read_only(stack: Stack) -> None:
    app_dir = stack.exec("touch", "/app/models/ballscrew-pitting/probe")
    assert app_dir.returncode != 0
    assert "Read-only file system" in app_dir.stderr
    root = stack.exec("touch", "/probe")
    assert root.returncode != 0
    tmp = stack.exec("touch", "/tmp/probe")
    assert tmp.returncode == 0, tmp.stderr
