"""Start and stop real ``uvicorn`` processes on a free loopback port for the benchmark.

Each server is its own process (as in production), bound to 127.0.0.1 only, started with an
explicit environment, and stopped by the benchmark itself (terminate, then kill after a grace
period) even when a level fails. Its CPU time is read from ``/proc`` so the report can say how
much CPU each image cost the server and how much the load generator took.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time (the message has its log tail)."""


def system_busy_seconds() -> float:
    """CPU-seconds all processes on this machine have spent busy so far (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_s: float = 0.0  # seconds from launch to ready

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def status(self) -> dict[str, int]:
        """Threads and resident memory (MiB), from /proc/<pid>/status."""
        info: dict[str, int] = {}
        try:
            lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        except OSError:
            return info
        for line in lines:
            key, _, value = line.partition(":")
            if key == "Threads":
                info["threads"] = int(value)
            elif key == "VmRSS":
                info["rss_mib"] = int(value.split()[0]) // 1024
        return info

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(
    name: str,
    app_factory: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    ready_path: str = "/ready",
    timeout: float = 180.0,
    attempts: int = 3,
) -> ServerProcess:
    """``python -m uvicorn <app_factory> --factory`` on a free loopback port; waits for ready.

    uvicorn binds the port itself, as in production. (Handing it a bound socket with ``--fd``
    would avoid the race below, but uvicorn wraps such a socket as AF_UNIX, so TCP_NODELAY is
    never set and Nagle's algorithm adds ~40 ms to every response.) A free port can be taken
    by another process between our probe and uvicorn's bind on a shared machine; that case,
    and only that one, is retried on a new port.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(name, app_factory, env, log_path, ready_path, timeout)
        except ServerStartError as exc:
            if "address already in use" not in str(exc).lower() or attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_once(
    name: str,
    app_factory: str,
    env: Mapping[str, str],
    log_path: Path,
    ready_path: str,
    timeout: float,
) -> ServerProcess:
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app_factory,
        "--factory",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",  # the service writes its own JSON access line per request
        "--log-level",
        "warning",
    ]
    full_env = {**os.environ, **env}
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(name, process, port, log_path)
    url = f"http://{HOST}:{port}{ready_path}"
    try:
        while True:
            if process.poll() is not None:
                raise ServerStartError(
                    f"{name} exited with {process.returncode} before ready:\n{server.log_tail()}"
                )
            if _get_status(url) == 200:
                time.sleep(0.3)  # a bind failure exits at once: make sure the 200 was ours
                if process.poll() is None:
                    break
                continue
            if time.perf_counter() - started > timeout:
                raise ServerStartError(
                    f"{name} not ready after {timeout:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    server.started_s = time.perf_counter() - started
    return server


@contextlib.contextmanager
def running_server(
    name: str,
    app_factory: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    ready_path: str = "/ready",
    timeout: float = 180.0,
) -> Iterator[ServerProcess]:
    server = start_server(name, app_factory, env, log_path, ready_path=ready_path, timeout=timeout)
    try:
        yield server
    finally:
        server.stop()
