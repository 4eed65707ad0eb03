"""Packaging checks that need no network and no Docker engine.

Why: the promises of the packaging (serving install without TensorFlow, every version pinned,
a non-root image, a service published on loopback only) must hold on every change, also on a
machine where the Docker tests skip.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "scikit-learn"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: not an exact pin: {line!r}"
        assert _norm(name) not in pins, f"constraints.txt: {name} pinned twice"
        pins[_norm(name)] = version.strip()
    return pins


def _declared() -> dict[str, list[str]]:
    project = _pyproject()
    return {
        "dependencies": project["project"]["dependencies"],
        "train": project["project"]["optional-dependencies"]["train"],
        "dev": project["dependency-groups"]["dev"],
    }


def test_serving_install_has_no_training_stack() -> None:
    serving = {_norm(Requirement(r).name) for r in _declared()["dependencies"]}
    assert not serving & TRAINING_STACK, serving & TRAINING_STACK
    assert "onnxruntime" in serving


def test_every_declared_requirement_is_pinned_and_allowed() -> None:
    pins = _constraints()
    for group, requirements in _declared().items():
        for text in requirements:
            req = Requirement(text)
            name = _norm(req.name)
            assert name in pins, f"{group}: {req.name} has no pin in constraints.txt"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{group}: constraints.txt pins {name}=={pins[name]}, outside {req}"
            )


def test_lock_covers_the_installed_dependency_closure() -> None:
    """Every distribution the project pulls in (transitively) is pinned, at the installed version.

    Walks the installed metadata from the declared requirements, so a new transitive
    dependency that constraints.txt forgot fails here instead of floating silently.
    """
    pins = _constraints()
    pending = [(Requirement(r), "") for reqs in _declared().values() for r in reqs]
    seen: set[str] = set()
    problems: list[str] = []
    while pending:
        req, extra = pending.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: required but not installed")
            continue
        if name not in pins:
            problems.append(f"{name}=={dist.version}: installed but not pinned")
        elif pins[name] != dist.version:
            problems.append(f"{name}: installed {dist.version}, pinned {pins[name]}")
        for child in dist.requires or []:
            for wanted_extra in sorted(req.extras) or [""]:
                pending.append((Requirement(child), wanted_extra))
    assert len(seen) > 30, f"suspiciously small closure: {sorted(seen)}"
    assert not problems, "\n".join(problems)


def test_console_scripts_point_at_main_functions() -> None:
    for script, target in _pyproject()["project"]["scripts"].items():
        module, _, func = target.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{script}: module {module} not found"
        assert spec.origin, f"{script}: module {module} has no source file"
        tree = ast.parse(Path(spec.origin).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert func in defined, f"{script}: {module} defines no {func}()"


def test_service_import_pulls_in_no_tensorflow() -> None:
    """The serving image has no TensorFlow: importing the app must not need it."""
    code = (
        "import sys, app.main\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules}"
        " & {'tensorflow', 'keras', 'tf2onnx', 'onnx', 'training', 'sklearn'})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _final_stage(dockerfile: str) -> list[str]:
    lines: list[str] = []
    for raw in dockerfile.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line.upper().startswith("FROM "):
            lines = []
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_runtime_stage_is_non_root_exec_form_with_healthcheck() -> None:
    stage = _final_stage((REPO / "Dockerfile").read_text())
    assert stage[0].split()[-1] == "runtime", stage[0]
    user = [line.split()[1] for line in stage if line.upper().startswith("USER ")]
    assert user, "runtime stage sets no USER"
    assert user[-1].split(":")[0] not in {"0", "root"}
    cmd = [line for line in stage if line.upper().startswith("CMD ")]
    assert cmd, "runtime stage has no CMD"
    assert cmd[-1][4:].lstrip().startswith("["), "CMD must be exec form"
    assert any(line.upper().startswith("HEALTHCHECK ") for line in stage)
    assert not any(re.search(r"tensorflow|keras|\[train\]", line) for line in stage)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_publishes_on_loopback_with_readonly_model(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    for port in api["ports"]:
        assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), port
    assert api["read_only"] is True
    assert any(t.startswith("/tmp") for t in api["tmpfs"])
    assert "./models:/app/models:ro" in api["volumes"]
    assert api["restart"] in {"always", "unless-stopped", "on-failure"}
    assert "healthcheck" in api
    assert all(key.startswith("DEFECT_") for key in api["environment"])


def test_compose_profiles_gpu_and_train(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["ORT_PACKAGE"] == "onnxruntime-gpu"
    assert gpu["environment"]["DEFECT_PROVIDER"].startswith("${DEFECT_GPU_PROVIDER:-cuda}")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"


def test_build_override_uses_host_network_for_every_built_service(compose: dict[str, Any]) -> None:
    override = yaml.safe_load((REPO / "docker-compose.build.yml").read_text())
    built = {name for name, svc in compose["services"].items() if "build" in svc}
    assert built == set(override["services"])
    for svc in override["services"].values():
        assert svc["build"]["network"] == "host"


def test_compose_passes_every_service_setting(compose: dict[str, Any]) -> None:
    """A setting the service gains must also be settable under compose (README table too)."""
    from app.settings import Settings

    # host/port configure `defect-serve`; in the image uvicorn binds 0.0.0.0:8000 itself.
    expected = {f"DEFECT_{name.upper()}" for name in Settings.model_fields} - {
        "DEFECT_HOST",
        "DEFECT_PORT",
    }
    for service in ("api", "api-gpu"):
        assert set(compose["services"][service]["environment"]) == expected, service


def test_readme_documents_every_setting_and_the_two_commands() -> None:
    from app.settings import Settings

    readme = (REPO / "README.md").read_text()
    missing = [
        f"DEFECT_{name.upper()}"
        for name in Settings.model_fields
        if f"`DEFECT_{name.upper()}`" not in readme
    ]
    assert not missing, f"README configuration table lacks {missing}"
    assert "make serve" in readme
    assert "make test" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "\nmake test || rc=$?\n" in ci, ".ci/run must run exactly the README's test command"
