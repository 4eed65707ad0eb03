"""Shared fixtures for the service tests.

API tests run the real app in-process (httpx.AsyncClient over ASGITransport, with the lifespan
run by asgi_lifespan.LifespanManager) against the shipped model in models/, with real photos
from the development dataset in tests/fixtures/ (see its README for attribution and licence).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL_DIR = REPO / "models" / "ballscrew-pitting"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass(frozen=True)
class FixtureImage:
    path: Path
    label: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def fixture_images() -> list[FixtureImage]:
    manifest = json.loads((FIXTURES / "labels.json").read_text())
    return [FixtureImage(FIXTURES / name, label) for name, label in sorted(manifest.items())]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # uvicorn serves on asyncio; the batcher hands results to asyncio futures


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    if not (SHIPPED_MODEL_DIR / "model_card.json").is_file():
        pytest.fail(f"the shipped model is missing: {SHIPPED_MODEL_DIR} (train it, see README)")
    return SHIPPED_MODEL_DIR


@pytest.fixture(scope="session")
def images() -> list[FixtureImage]:
    return fixture_images()


@pytest.fixture
def model_copy(tmp_path: Path, shipped_model_dir: Path) -> Path:
    """A private copy of the shipped model folder, for tests that break it on purpose."""
    target = tmp_path / "model"
    shutil.copytree(shipped_model_dir, target, ignore=shutil.ignore_patterns("plots", "*.json~"))
    return target


def edit_card(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / "model_card.json"
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


class AppClient(httpx.AsyncClient):
    """An httpx client bound to one in-process app (``.app`` gives access to its state)."""

    app: FastAPI


async def wait_until_loaded(app: FastAPI, timeout: float = 60.0) -> None:
    """Loading runs in the background; wait until it has finished (ready or failed)."""
    await asyncio.wait_for(app.state.service.wait_loaded(), timeout)


AppClientFactory = Callable[..., AbstractAsyncContextManager[AppClient]]


@pytest.fixture(scope="session")
def app_client(shipped_model_dir: Path) -> AppClientFactory:
    """``async with app_client(**settings) as client``: an app with its lifespan, loaded."""
    from app.main import create_app
    from app.settings import Settings

    @asynccontextmanager
    async def factory(
        raise_app_exceptions: bool = True, **overrides: Any
    ) -> AsyncIterator[AppClient]:
        overrides.setdefault("model_dir", shipped_model_dir)
        overrides.setdefault("warmup_runs", 0)  # warm-up has its own test; keep tests quick
        overrides.setdefault("batch_autotune", False)  # keeps batch sizes predictable
        app = create_app(Settings(**overrides))
        async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30) as manager:
            transport = httpx.ASGITransport(
                app=manager.app, raise_app_exceptions=raise_app_exceptions
            )
            async with AppClient(
                transport=transport, base_url="http://testserver", timeout=30
            ) as client:
                client.app = app
                await wait_until_loaded(app)
                yield client

    return factory
