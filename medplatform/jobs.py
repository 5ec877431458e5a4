"""The job queue: submit, read, cancel and log train / evaluate / predict jobs; claim, heartbeat, finish and reap.

Rows are ``medplatform.db.Job``; a job runs in a worker process (``medplatform.worker``), never in the server.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from medplatform.db import JOB_KINDS, JOB_STATUSES, Dataset, Job, utcnow, write_session
from medplatform.errors import Conflict, InvalidValue, NotFound
from medplatform.registry import DEFAULT_MODEL, check_name, parse_model_spec

if TYPE_CHECKING:
    from medplatform.context import Platform

FINISHED = ("succeeded", "failed", "cancelled")
TRAIN_PRESETS = ("default", "paper", "tiny")  # training.phases.RUN_PRESETS, without importing torch here
PHASE_PLANS = (("transunet",), ("transunet", "refiner", "e2e"))  # a TransUNet alone, or the whole UltraRefiner
FINE_TUNE_PHASES = ("e2e",)  # with ``init``: the end-to-end phase from a registered version's weights
CANCEL_FLAG = "cancel_requested"  # key in Job.progress: set by cancel_job, seen by the worker's next report
MAX_LIST = 500


def _integer(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidValue(field, value, f"expected an integer in [{low}, {high}]")
    return value


def _learning_rate(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise InvalidValue(field, value, "expected a number in (0, 1]")
    return float(value)


def _preset(field: str, value: Any) -> str:
    if value not in TRAIN_PRESETS:
        raise InvalidValue(field, value, f"expected one of {', '.join(TRAIN_PRESETS)}")
    return str(value)


def _phases(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or tuple(value) not in (*PHASE_PLANS, FINE_TUNE_PHASES):
        raise InvalidValue(field, value, "expected [\"transunet\"] (a TransUNet alone), "
                                         "[\"transunet\", \"refiner\", \"e2e\"] (the whole UltraRefiner) or, "
                                         "with init, [\"e2e\"]")
    return list(value)


def _model_spec(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidValue(field, value, "expected a registered version to start from: name:N or name@alias")
    try:
        parse_model_spec(value)
    except InvalidValue as exc:
        raise InvalidValue(field, value, str(exc)) from None
    return value


def _dataset_id(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidValue(field, value, "expected a dataset id")
    return value


# name -> (check, default); None: the preset's value for each phase.
_TRAIN_FIELDS: dict[str, tuple[Any, Any]] = {
    "epochs": (lambda f, v: _integer(f, v, 1, 1000), None),
    "learning_rate": (_learning_rate, None),
    "batch_size": (lambda f, v: _integer(f, v, 1, 512), None),
    "preset": (_preset, "default"),
    "phases": (_phases, list(PHASE_PLANS[-1])),
    "seed": (lambda f, v: _integer(f, v, 0, 2**31 - 1), 0),
    # Fine-tuning: start from a registered version (pinned to name:N at submit), run only the e2e phase, and
    # optionally add the train split of a second dataset (e.g. the original training set) to the training data.
    "init": (_model_spec, None),
    "replay_dataset": (_dataset_id, None),
}


def check_hyperparameters(kind: str, hyperparameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """The hyperparameters a job of ``kind`` runs with (defaults filled in), or ``InvalidValue`` naming the field.

    ``train``: ``epochs`` int [1, 1000], ``learning_rate`` (0, 1], ``batch_size`` int [1, 512] (absent: the
    preset's per-phase values), ``preset`` (architecture variant) one of ``TRAIN_PRESETS``, ``phases`` one of
    ``PHASE_PLANS``, ``seed`` int >= 0. ``evaluate`` / ``predict`` take none. Unknown keys are refused.
    """
    if hyperparameters is None:
        hyperparameters = {}
    if not isinstance(hyperparameters, Mapping):
        raise InvalidValue("hyperparameters", hyperparameters, "expected an object")
    allowed = _TRAIN_FIELDS if kind == "train" else {}
    for key in hyperparameters:
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else f"none for a {kind} job"
            raise InvalidValue(f"hyperparameters.{key}", hyperparameters[key],
                               f"unknown hyperparameter; expected {expected}")
    checked: dict[str, Any] = {}
    for key, (check, default) in allowed.items():
        if key in hyperparameters:
            checked[key] = check(f"hyperparameters.{key}", hyperparameters[key])
        elif default is not None:
            checked[key] = default
    if kind == "train":
        _check_fine_tune(hyperparameters, checked)
    return checked


def _check_fine_tune(given: Mapping[str, Any], checked: dict[str, Any]) -> None:
    """With ``init``: phases ``["e2e"]`` (the default), preset from the init run unless given. Without it, the
    fine-tune-only fields and phase plan are refused."""
    if "init" in checked:
        if "phases" not in given:
            checked["phases"] = list(FINE_TUNE_PHASES)
        elif tuple(checked["phases"]) != FINE_TUNE_PHASES:
            raise InvalidValue("hyperparameters.phases", given["phases"], "a fine-tune (init) runs [\"e2e\"]")
        if "preset" not in given:
            checked.pop("preset", None)  # the init run's own preset (its image size), read by the job
        return
    if tuple(checked.get("phases", ())) == FINE_TUNE_PHASES:
        raise InvalidValue("hyperparameters.phases", given.get("phases"), "[\"e2e\"] alone needs init: the "
                                                                         "registered version to fine-tune")
    if "replay_dataset" in checked:
        raise InvalidValue("hyperparameters.replay_dataset", checked["replay_dataset"],
                           "replay_dataset is for a fine-tune: set init too")


def _check_recipe(platform: Platform, kind: str, recipe: str | None) -> str:
    """``train``: the model name the new version registers under (default ``default``); ``evaluate`` /
    ``predict``: the version to run (``name:3``, ``name@alias``, ``name`` = its ``production``), pinned as
    ``name:N`` so that moving an alias later does not change what the job runs."""
    if kind == "train":
        return check_name(DEFAULT_MODEL if recipe is None else recipe, field="recipe")
    if not isinstance(recipe, str):
        raise InvalidValue("recipe", recipe, f"a {kind} job needs the model version to run: name:N or name@alias")
    try:
        name, ref = parse_model_spec(recipe)
    except InvalidValue as exc:
        raise InvalidValue("recipe", recipe, str(exc)) from exc
    try:
        info = platform.registry.resolve(name, ref)
    except NotFound as exc:
        raise NotFound("recipe", recipe, str(exc)) from exc
    return f"{info.name}:{info.version}"


def _pin(platform: Platform, spec: str, field: str) -> str:
    name, ref = parse_model_spec(spec)
    try:
        info = platform.registry.resolve(name, ref)
    except NotFound as exc:
        raise NotFound(field, spec, str(exc)) from exc
    return f"{info.name}:{info.version}"


def submit_job(platform: Platform, kind: str, dataset_id: str | None, recipe: str | None = None,
               hyperparameters: Mapping[str, Any] | None = None) -> Job:
    """Queue a job; returns its row (``status`` ``queued``). Runs nowhere until a worker claims it.

    Raises:
        InvalidValue: ``kind``, ``dataset``, ``recipe`` or ``hyperparameters.<field>`` malformed or out of range.
        NotFound: the dataset (field ``dataset``) or the model version (field ``recipe``) does not exist.
        Conflict: the dataset's status is not ``ready``.
    """
    if kind not in JOB_KINDS:
        raise InvalidValue("kind", kind, f"expected one of {', '.join(JOB_KINDS)}")
    checked = check_hyperparameters(kind, hyperparameters)
    if not isinstance(dataset_id, str) or not dataset_id:
        raise InvalidValue("dataset", dataset_id, "expected a dataset id")
    pinned = _check_recipe(platform, kind, recipe)
    if "init" in checked:  # pinned like an evaluate recipe: a later promotion does not change the start
        checked["init"] = _pin(platform, checked["init"], "hyperparameters.init")
    with write_session(platform.sessions) as session:  # datasets.delete_dataset cannot slip in between
        for field, wanted in (("dataset", dataset_id), ("hyperparameters.replay_dataset", checked.get(
                "replay_dataset"))):
            if wanted is None:
                continue
            dataset = session.get(Dataset, wanted)
            if dataset is None:
                raise NotFound(field, wanted, "no such dataset")
            if dataset.status != "ready":
                raise Conflict(field, wanted, f"dataset status is {dataset.status!r}; expected 'ready'")
        job = Job(kind=kind, dataset_id=dataset_id, recipe=pinned, hyperparameters=checked, status="queued",
                  progress={})
        session.add(job)
    return job


def get_job(platform: Platform, job_id: str) -> Job:
    """The job's row as stored now; ``NotFound`` (field ``job``) when there is none."""
    with platform.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound("job", job_id, "no such job")
        return job


def list_jobs(platform: Platform, *, status: str | None = None, limit: int = 100) -> list[Job]:
    """Jobs newest first, optionally of one ``status``; at most ``limit`` (1..500)."""
    if status is not None and status not in JOB_STATUSES:
        raise InvalidValue("status", status, f"expected one of {', '.join(JOB_STATUSES)}")
    _integer("limit", limit, 1, MAX_LIST)
    query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    with platform.sessions() as session:
        return list(session.scalars(query))


def cancel_job(platform: Platform, job_id: str) -> Job:
    """Cancel: a queued job is ``cancelled`` at once; a running one gets the cancel flag, which its worker sees at
    its next progress report (the next epoch) and then ends it ``cancelled``. ``Conflict`` if already finished."""
    with write_session(platform.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound("job", job_id, "no such job")
        if job.status in FINISHED:
            raise Conflict("job", job_id, f"the job already {job.status}")
        if job.status == "queued":
            job.status, job.finished_at = "cancelled", utcnow()
        else:
            job.progress = {**(job.progress or {}), CANCEL_FLAG: True}
        return job


def job_log(platform: Platform, job_id: str) -> str:
    """The job's captured log (UTF-8 text); empty while it has none (queued). Updated at every progress report."""
    job = get_job(platform, job_id)
    if not job.log_blob_key or not platform.blobs.exists(job.log_blob_key):
        return ""
    return platform.blobs.get_bytes(job.log_blob_key).decode("utf-8", errors="replace")


def log_key(job_id: str) -> str:
    return f"jobs/{job_id}/log.txt"


def job_to_dict(job: Job) -> dict[str, Any]:
    """JSON-ready view of a job (what ``GET /jobs/{id}`` answers)."""
    def iso(value: dt.datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {"id": job.id, "kind": job.kind, "dataset": job.dataset_id, "recipe": job.recipe,
            "hyperparameters": job.hyperparameters, "status": job.status, "progress": job.progress,
            "error": job.error, "worker_id": job.worker_id, "worker_pid": job.worker_pid,
            "heartbeat_at": iso(job.heartbeat_at), "created_at": iso(job.created_at),
            "started_at": iso(job.started_at), "finished_at": iso(job.finished_at), "result": job.result}


# -- the worker's side -------------------------------------------------------------------------------------------


def _start(job: Job, worker_id: str, pid: int) -> Job:
    now = utcnow()
    job.status, job.worker_id, job.worker_pid = "running", worker_id, pid
    job.heartbeat_at = job.started_at = now
    job.log_blob_key = log_key(job.id)
    return job


def claim_next(platform: Platform, worker_id: str, pid: int) -> Job | None:
    """Claim the oldest queued job not handed to another runner (``worker_id`` unset); None when there is none.

    Under the write lock (SQLite ``BEGIN IMMEDIATE``; ``FOR UPDATE SKIP LOCKED`` elsewhere), so two workers
    never claim the same job.
    """
    query = (select(Job).where(Job.status == "queued", Job.worker_id.is_(None))
             .order_by(Job.created_at, Job.id).limit(1).with_for_update(skip_locked=True))
    with write_session(platform.sessions) as session:
        job = session.scalars(query).first()
        return None if job is None else _start(job, worker_id, pid)


def claim(platform: Platform, job_id: str, worker_id: str, pid: int, *, dispatched_as: str | None = None) -> Job:
    """Claim one named job (``python -m medplatform run-job``, what a Ray job runs).

    ``dispatched_as``: the runner id the job was handed to (``RayRunner.submit``), which it must still carry.
    Raises ``NotFound``, or ``Conflict`` when the job is not queued (cancelled, or another worker has it).
    """
    with write_session(platform.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound("job", job_id, "no such job")
        if job.status != "queued" or job.worker_id != dispatched_as:
            raise Conflict("job", job_id, f"the job is {job.status} (worker {job.worker_id}); expected it queued"
                                          + (f" for {dispatched_as}" if dispatched_as else ""))
        return _start(job, worker_id, pid)


def dispatch(platform: Platform, job_id: str, runner_id: str) -> Job:
    """Mark a queued job as handed to another runner (e.g. ``ray:<submission id>``) so local workers skip it."""
    with write_session(platform.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound("job", job_id, "no such job")
        if job.status != "queued" or job.worker_id is not None:
            raise Conflict("job", job_id, f"the job is {job.status} (worker {job.worker_id}); expected it queued")
        job.worker_id = runner_id
        return job


def _own(session: Any, job_id: str, worker_id: str) -> Job | None:
    job = session.get(Job, job_id)
    return job if job is not None and job.status == "running" and job.worker_id == worker_id else None


def heartbeat(platform: Platform, job_id: str, worker_id: str) -> bool:
    """Record that the worker is alive; returns whether it should stop (cancel requested, or not its job now)."""
    with write_session(platform.sessions) as session:
        job = _own(session, job_id, worker_id)
        if job is None:
            return True
        job.heartbeat_at = utcnow()
        return bool((job.progress or {}).get(CANCEL_FLAG))


def report_progress(platform: Platform, job_id: str, worker_id: str, progress: Mapping[str, Any]) -> bool:
    """Replace the job's progress (keeping a cancel flag) and heartbeat; returns whether it should stop."""
    with write_session(platform.sessions) as session:
        job = _own(session, job_id, worker_id)
        if job is None:
            return True
        cancel = bool((job.progress or {}).get(CANCEL_FLAG))
        job.progress = {**progress, **({CANCEL_FLAG: True} if cancel else {})}
        job.heartbeat_at = utcnow()
        return cancel


def finish(platform: Platform, job_id: str, worker_id: str, status: str, *, error: str | None = None,
           result: Mapping[str, Any] | None = None) -> bool:
    """End a running job this worker holds as ``succeeded`` / ``failed`` / ``cancelled`` (or back to ``queued``
    when the worker is stopping); False when it is no longer this worker's (e.g. reaped meanwhile)."""
    if status not in (*FINISHED, "queued"):
        raise InvalidValue("status", status, f"expected one of {', '.join((*FINISHED, 'queued'))}")
    with write_session(platform.sessions) as session:
        job = _own(session, job_id, worker_id)
        if job is None:
            return False
        job.status, job.error = status, error
        job.result = dict(result) if result is not None else job.result
        if status == "queued":  # requeued: the next worker starts it afresh
            job.worker_id = job.worker_pid = job.heartbeat_at = job.started_at = None
            job.progress = {}
        else:
            job.finished_at = utcnow()
        return True


def reap_stale(platform: Platform, stale_after_s: float, *, now: dt.datetime | None = None) -> list[str]:
    """Mark running jobs whose heartbeat is older than ``stale_after_s`` as ``failed`` with the reason
    ("worker W (pid P) stopped heartbeating at T"); returns their ids. Every worker runs it between jobs, and
    the server should at start, so a job whose worker died is never left ``running``."""
    if not (math.isfinite(stale_after_s) and stale_after_s > 0):
        raise InvalidValue("stale_after_s", stale_after_s, "expected a positive number of seconds")
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stale_after_s)
    query = select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
    with write_session(platform.sessions) as session:
        reaped = []
        for job in session.scalars(query):
            beat = job.heartbeat_at.isoformat() if job.heartbeat_at else "never"
            job.status, job.finished_at = "failed", now
            job.error = f"worker {job.worker_id} (pid {job.worker_pid}) stopped heartbeating at {beat}"
            reaped.append(job.id)
        return reaped


def end_dispatched(platform: Platform, job_id: str, runner_id: str, reason: str) -> Job | None:
    """A job handed to another runner (``dispatch``) whose run ended without finishing it (the Ray job failed or
    was stopped): ``cancelled`` when a cancel was requested, else ``failed`` with ``reason``. None when the job
    is not (or no longer) that runner's or has already finished."""
    with write_session(platform.sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in FINISHED or not (job.worker_id or "").startswith(runner_id):
            return None
        cancel = bool((job.progress or {}).get(CANCEL_FLAG))
        job.status, job.finished_at = ("cancelled" if cancel else "failed"), utcnow()
        job.error = "cancelled by request" if cancel else reason
        return job
