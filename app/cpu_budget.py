"""How many CPUs this process may really use.

``os.cpu_count()`` reports the host's cores, not the container's share: a container limited to
2 CPUs on a 64-core host that starts 64 onnxruntime threads spends its time being throttled.
The budget is the smaller of the CPU affinity mask and the cgroup CPU quota (v2 ``cpu.max`` or
v1 ``cpu.cfs_quota_us``), searched from the process's own cgroup up to the root.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (what the scheduler lets it run on)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(relative: str) -> list[str]:
    """``/a/b`` -> ``["a/b", "a", ""]``: limits set on any ancestor cgroup apply too."""
    parts = [part for part in relative.strip("/").split("/") if part]
    return ["/".join(parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = float(fields[0]), float(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    quota_text = _read(directory / "cpu.cfs_quota_us")
    period_text = _read(directory / "cpu.cfs_period_us")
    if not quota_text or not period_text:
        return None
    try:
        quota, period = float(quota_text), float(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(
    root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU quota (in CPUs, may be fractional) that applies, or None if unlimited."""
    membership = _read(proc_self_cgroup) or ""
    v2_path = "/"
    v1_paths: list[tuple[str, str]] = []  # (controller mount name, relative path)
    for line in membership.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, relative = fields
        if controllers == "":
            v2_path = relative
        elif "cpu" in controllers.split(","):
            v1_paths.append((controllers, relative))

    quotas: list[float] = []
    for base in (root, root / "unified"):
        for ancestor in _ancestors(v2_path):
            quota = _v2_quota(base / ancestor)
            if quota is not None:
                quotas.append(quota)
    v1_paths = v1_paths or [("cpu", "/")]
    for controllers, relative in v1_paths:
        for mount in dict.fromkeys((controllers, "cpu", "cpu,cpuacct")):
            for ancestor in _ancestors(relative):
                quota = _v1_quota(root / mount / ancestor)
                if quota is not None:
                    quotas.append(quota)
    return min(quotas) if quotas else None


def available_cpus(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Whole CPUs the process can use: min(affinity, ceil(cgroup quota)), at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_limit(root, proc_self_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """How the CPU budget is split: parallel model runs x threads inside each run."""

    inference_workers: int
    intra_op_threads: int


def plan_threads(cpus: int, *, workers: int, intra_op_threads: int, gpu: bool) -> ThreadPlan:
    """Defaults for the settings left at 0 (auto), so that workers x intra-op threads = CPUs.

    On a CPU, independent model runs side by side scale better than more threads inside one
    run (every operator ends in a barrier where threads wait for each other, and a descheduled
    thread stalls the whole run), so the default is one single-threaded run per CPU. On a GPU
    one worker feeds the device and the intra-op threads serve the few operators left on the CPU.
    """
    cpus = max(1, cpus)
    if workers <= 0:
        if gpu:
            workers = 1
        elif intra_op_threads > 0:
            workers = max(1, cpus // intra_op_threads)
        else:
            workers = cpus
    if intra_op_threads <= 0:
        intra_op_threads = cpus if gpu else max(1, cpus // workers)
    return ThreadPlan(inference_workers=workers, intra_op_threads=intra_op_threads)
