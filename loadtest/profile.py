"""Sampling profiles with py-spy (optional dependency) and where-the-time-goes summaries."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["py_spy_available", "record_command", "start_recording", "summarise_collapsed"]

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINE_NO = re.compile(r":\d+\)$")


def py_spy_available() -> str | None:
    """Path of the ``py-spy`` executable (next to this interpreter first), or None."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def record_command(out: str | Path, *, duration_s: float, pid: int | None = None,
                   command: Sequence[str] | None = None, rate: int = 100) -> list[str]:
    """``py-spy record`` of ``pid`` and its subprocesses, or of ``command``, into collapsed stacks at ``out``."""
    exe = py_spy_available()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    cmd = [exe, "record", "--format", "raw", "--output", str(out), "--rate", str(rate), "--subprocesses",
           "--nonblocking"]
    if pid is not None:
        return [*cmd, "--duration", str(max(1, int(duration_s))), "--pid", str(pid)]
    if command is None:
        raise ValueError("record_command needs pid or command")
    return [*cmd, "--", *command]


def start_recording(pid: int, out: str | Path, duration_s: float, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid``'s process tree in the background (wait on the returned process)."""
    return subprocess.Popen(record_command(out, duration_s=duration_s, pid=pid, rate=rate),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# Frames on (nearly) every stack that say nothing about where the time goes.
_BOILERPLATE = re.compile(
    r"^(process \d+:|<module> |_run_module_as_main |_run_code |Thread\._bootstrap|Thread\.run |"
    r"_worker \(concurrent|_WorkItem\.run |main \(loadtest/__main__)"
)


def _function(frame: str) -> str:
    """``segment (inference/pipeline.py:470)`` -> ``segment (inference/pipeline.py)`` (lines merged)."""
    return _LINE_NO.sub(")", frame.strip())


def summarise_collapsed(text: str, *, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the ``top`` functions in collapsed-stack ``text``.

    Inclusive shares leave out boilerplate frames present on every stack (process roots, thread and
    ``runpy`` entry points).

    Returns:
        ``{"samples": N, "self": [{"function", "share"}...], "inclusive": [...]}``, shares in [0, 1].

    Raises:
        ValueError: a line that is not ``stack COUNT``.
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"collapsed stacks line {number}: expected 'frame;frame;... COUNT', got {line[:80]!r}")
        count = int(match["count"])
        frames = [_function(f) for f in match["stack"].split(";") if f.strip()]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            if not _BOILERPLATE.match(name):
                inclusive[name] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "share": count / total} for name, count in counter.most_common(top)]

    return {"samples": total, "self": rows(self_counts) if total else [], "inclusive": rows(inclusive) if total else []}
