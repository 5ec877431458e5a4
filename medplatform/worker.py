"""The job worker process: claims queued jobs from the database, runs them with a heartbeat, captures their log."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError

from medplatform import jobs
from medplatform.db import Job

if TYPE_CHECKING:
    from medplatform.context import Platform

log = logging.getLogger("medplatform.worker")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JobCancelled(Exception):
    """The job's cancel flag was seen at a progress report."""


class WorkerStopping(Exception):
    """The worker was asked to stop (SIGTERM) while running the job; the job goes back to the queue."""


@dataclass(frozen=True)
class WorkerSettings:
    """Timing of a worker, from MEDREFINE_JOB_HEARTBEAT_S / _STALE_S / _POLL_S and MEDREFINE_JOB_DEVICE.

    ``heartbeat_s``: how often a running job's ``heartbeat_at`` is refreshed (and its log uploaded);
    ``stale_after_s``: a running job whose heartbeat is older is failed by the reaper (keep it well above
    ``heartbeat_s``: a busy machine delays beats); ``poll_s``: idle wait between queue polls;
    ``device``: torch device for jobs ("" = cuda when available, else cpu).
    """

    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0
    poll_s: float = 1.0
    device: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        from medplatform.errors import InvalidValue

        values: dict[str, Any] = {}
        for field, name in (("heartbeat_s", "MEDREFINE_JOB_HEARTBEAT_S"), ("stale_after_s", "MEDREFINE_JOB_STALE_S"),
                            ("poll_s", "MEDREFINE_JOB_POLL_S")):
            if env.get(name):
                try:
                    values[field] = float(env[name])
                except ValueError as exc:
                    raise InvalidValue(name, env[name], "expected a number of seconds") from exc
                if not values[field] > 0:
                    raise InvalidValue(name, env[name], "expected a positive number of seconds")
        return cls(**values, device=env.get("MEDREFINE_JOB_DEVICE", ""))

    def torch_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def worker_id() -> str:
    """``host:pid``: who holds a job, in the reaper's message."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Beat(threading.Thread):
    """Refreshes the job's heartbeat and uploads its log every ``interval`` s; notes a cancel request."""

    def __init__(self, platform: Platform, job: Job, wid: str, interval: float, log_file: Path) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.platform, self.job, self.wid, self.interval, self.log_file = platform, job, wid, interval, log_file
        self.done, self.stop_requested = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                if jobs.heartbeat(self.platform, self.job.id, self.wid):
                    self.stop_requested.set()
                upload_log(self.platform, self.job, self.log_file)
            except Exception:  # a missed beat is retried; a long outage is what the reaper is for
                log.exception("heartbeat of job %s failed", self.job.id)


def upload_log(platform: Platform, job: Job, log_file: Path) -> None:
    if job.log_blob_key and log_file.is_file():
        platform.blobs.put_file(job.log_blob_key, log_file)


def run_claimed(platform: Platform, job: Job, wid: str, settings: WorkerSettings,
                stopping: threading.Event | None = None) -> str:
    """Run a job this worker has claimed to its end; returns the final status it recorded.

    Progress comes from the trainer's epoch observer (``training.loop.observe_epochs``) and the runners'
    reports; each report checks the cancel flag and ``stopping``. The log (root logger, INFO) goes to a file
    uploaded to ``jobs/<id>/log.txt`` at every report, every beat and at the end, whatever the outcome.
    """
    from medplatform.job_runs import RUNNERS, JobContext

    stopping = stopping or threading.Event()
    with tempfile.TemporaryDirectory(prefix=f"medrefine-job-{job.id[:8]}-") as tmp:
        workdir = Path(tmp)
        log_file = workdir / "job.log"
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        previous_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        beat = _Beat(platform, job, wid, settings.heartbeat_s, log_file)
        beat.start()
        state: dict[str, Any] = {}  # the job's progress so far; each report updates some of its keys

        def report(progress: Mapping[str, Any]) -> None:
            state.update(progress)
            upload_log(platform, job, log_file)  # the stored log is never behind the stored progress
            if jobs.report_progress(platform, job.id, wid, state) or beat.stop_requested.is_set():
                raise WorkerStopping() if stopping.is_set() else JobCancelled()
            if stopping.is_set():
                raise WorkerStopping()

        def observe(title: str, epochs: int, row: dict[str, Any]) -> None:
            val = row.get("val_dice", row.get("val_refined_dice"))
            report({"phase": title, "epoch": int(row["epoch"]), "epochs": epochs,
                    "train_loss": _number(row.get("train_loss")), "val_dice": _number(val)})

        status, error, result = "failed", None, None
        try:
            from training.loop import observe_epochs

            log.info("job %s (%s) started by worker %s", job.id, job.kind, wid)
            context = JobContext(platform=platform, job=job, workdir=workdir / "work",
                                 device=settings.torch_device(), report=report)
            context.workdir.mkdir()
            with observe_epochs(observe):
                result = RUNNERS[job.kind](context)
            status = "succeeded"
        except JobCancelled:
            status, error = "cancelled", "cancelled by request"
        except WorkerStopping:
            status, error = "queued", None
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        finally:
            log.info("job %s ends %s", job.id, status)
            beat.done.set()
            beat.join()
            root.removeHandler(handler)
            root.setLevel(previous_level)
            handler.close()
            try:
                upload_log(platform, job, log_file)
            except Exception:
                log.exception("uploading the log of job %s failed", job.id)
            if not jobs.finish(platform, job.id, wid, status, error=error, result=result):
                log.warning("job %s was no longer held by %s at its end (reaped?)", job.id, wid)
    return status


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def serve(platform: Platform, settings: WorkerSettings, *, stop: threading.Event | None = None,
          max_jobs: int | None = None) -> int:
    """Claim and run queued jobs one at a time until ``stop`` is set (SIGTERM) or ``max_jobs`` ran; reaps
    stale jobs between jobs. Returns the number of jobs run."""
    stop = stop or threading.Event()
    wid, ran, last_reap = worker_id(), 0, -float("inf")
    log.info("worker %s polling %s", wid, platform.db_url)
    while not stop.is_set() and (max_jobs is None or ran < max_jobs):
        try:
            if time.monotonic() - last_reap >= min(settings.stale_after_s / 2, 30.0):
                for job_id in jobs.reap_stale(platform, settings.stale_after_s):
                    log.warning("job %s: its worker stopped heartbeating; marked failed", job_id)
                last_reap = time.monotonic()
            job = jobs.claim_next(platform, wid, os.getpid())
        except OperationalError:  # the database is away or locked past its timeout: try again, do not exit
            log.exception("worker %s could not poll the queue", wid)
            job = None
        if job is None:
            stop.wait(settings.poll_s)
            continue
        run_claimed(platform, job, wid, settings, stop)
        ran += 1
    return ran


def run_one(platform: Platform, job_id: str, settings: WorkerSettings, *, dispatched_as: str | None = None) -> str:
    """Claim and run one named job in this process (what a Ray job runs); returns its final status."""
    wid = worker_id() if dispatched_as is None else f"{dispatched_as}@{worker_id()}"
    job = jobs.claim(platform, job_id, wid, os.getpid(), dispatched_as=dispatched_as)
    return run_claimed(platform, job, wid, settings)


def install_sigterm(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop``: the running job stops at its next report and goes back to the queue."""
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def start_local_workers(n: int = 1, *, env: Mapping[str, str] | None = None,
                        log_dir: str | os.PathLike[str] | None = None) -> list[subprocess.Popen[bytes]]:
    """Spawn ``n`` worker processes (``python -m medplatform worker``) with ``env`` (default: this process's);
    each claims jobs from the same database. Stop them with ``stop_local_workers``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        from medplatform.errors import InvalidValue

        raise InvalidValue("concurrency", n, "expected an integer >= 1")
    procs = []
    for index in range(n):
        out: Any = subprocess.DEVNULL
        if log_dir is not None:
            out = open(Path(log_dir) / f"worker-{index}.log", "ab")  # noqa: SIM115 (the child owns it)
        procs.append(subprocess.Popen([sys.executable, "-m", "medplatform", "worker"],
                                      env=dict(os.environ if env is None else env), stdout=out,
                                      stderr=subprocess.STDOUT, cwd=_repo_root()))
        if log_dir is not None:
            out.close()
    return procs


def stop_local_workers(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM each worker (a running job is requeued at its next report), SIGKILL after ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])
