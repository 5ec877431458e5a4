"""Who else uses the machine during a benchmark: the busiest other processes, and the CPU's instruction sets."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

__all__ = ["SIMD_FLAGS", "busiest_processes", "instruction_sets"]

# the flags that decide which ONNX Runtime / MLAS kernels run
SIMD_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def instruction_sets(cpuinfo: str | None = None) -> list[str]:
    """The SIMD extensions of :data:`SIMD_FLAGS` this CPU reports in ``/proc/cpuinfo`` (empty if unknown)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in SIMD_FLAGS if f in flags]
    return []


def busiest_processes(*, sample_s: float = 1.0, top: int = 5, exclude_pids: set[int] | None = None) -> dict[str, Any]:
    """The ``top`` processes by CPU over ``sample_s`` seconds, this process's tree left out.

    Returns ``{"sample_s", "other_cores", "processes": [{"pid", "name", "cmd", "nice", "cores"}]}``.
    """
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.children(recursive=True)), *(exclude_pids or set())}
    procs = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid in skip:
            continue
        try:
            proc.cpu_percent(None)  # primes the counter
            procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    time.sleep(sample_s)
    rows = []
    for proc in procs:
        try:
            with proc.oneshot():
                cores = proc.cpu_percent(None) / 100.0
                if cores < 0.01:
                    continue
                rows.append({"pid": proc.pid, "name": proc.name(), "cmd": " ".join(proc.cmdline()[:6])[:160],
                             "nice": proc.nice(), "autogroup": _autogroup(proc.pid), "cores": round(cores, 3)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    rows.sort(key=lambda r: r["cores"], reverse=True)
    return {
        "sample_s": sample_s,
        "other_cores": round(sum(r["cores"] for r in rows), 3),
        "loadavg_1min": os.getloadavg()[0],
        "sched_autogroup_enabled": _read("/proc/sys/kernel/sched_autogroup_enabled"),
        "busy_autogroups": len({r["autogroup"] for r in rows if r["cores"] >= 0.05 and r["autogroup"]}),
        "processes": rows[:top],
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _autogroup(pid: int) -> str | None:
    """``"/autogroup-917 nice 0"`` -> ``"917 nice 0"``; None where the kernel has no autogroups."""
    text = _read(f"/proc/{pid}/autogroup")
    return text.removeprefix("/autogroup-") if text else None
