"""The cluster runner: a queued job becomes a Ray job (``ray.job_submission``) running
``python -m medplatform run-job ID`` on the cluster, against the same database and blob store.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medplatform import jobs
from medplatform.db import Job

if TYPE_CHECKING:
    from medplatform.context import Platform

# Ray's JobStatus -> the job status it implies (the row is the truth once the run has claimed it).
RAY_STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
              "STOPPED": "cancelled"}
RAY_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
FORWARDED_ENV = ("MEDREFINE_DB_URL", "MEDREFINE_DATA_DIR", "MEDREFINE_S3_BUCKET", "MEDREFINE_S3_ENDPOINT_URL",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "BENTOML_HOME", "MEDREFINE_JOB_HEARTBEAT_S",
                 "MEDREFINE_JOB_DEVICE", "MEDREFINE_CACHE_DIR")


def submission_id(job_id: str) -> str:
    """The Ray submission id of a job: derived, so nothing more needs storing to find it again."""
    return f"medrefine-{job_id}"


class RayRunner:
    """Submit, follow and stop jobs on a Ray cluster through its Jobs API (the dashboard's HTTP address).

    Args:
        address: ``http://HEAD:8265`` (the dashboard), as ``JobSubmissionClient`` takes it.
        env: environment variables the run needs on the cluster (``runtime_env.env_vars``): at least
            ``MEDREFINE_DB_URL`` and the blob store's settings; credentials come from the cluster's own
            environment, not from here. Default: the ``FORWARDED_ENV`` variables set in this process.
        python: the interpreter on the cluster that has medrefine installed.
        num_cpus, num_gpus: what the entrypoint reserves on the cluster.
    """

    def __init__(self, address: str, *, env: Mapping[str, str] | None = None, python: str = "python",
                 num_cpus: float = 1, num_gpus: float = 0, client: Any = None) -> None:
        if client is None:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(address)
        self.client = client
        if env is None:
            import os

            env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        self.env = dict(env)
        self.python, self.num_cpus, self.num_gpus = python, num_cpus, num_gpus

    @staticmethod
    def runner_id(job_id: str) -> str:
        return f"ray:{submission_id(job_id)}"

    def submit(self, platform: Platform, job_id: str) -> str:
        """Hand a queued job to Ray (local workers skip it from now on); returns the submission id.

        A refused submission fails the job with Ray's reason, so it is never left queued for a runner that
        will not run it.
        """
        runner = self.runner_id(job_id)
        jobs.dispatch(platform, job_id, runner)
        entrypoint = " ".join(shlex.quote(part) for part in (
            self.python, "-m", "medplatform", "run-job", job_id, "--dispatched-as", runner))
        try:
            return self.client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id(job_id), runtime_env={"env_vars": self.env},
                entrypoint_num_cpus=self.num_cpus, entrypoint_num_gpus=self.num_gpus,
                metadata={"medrefine_job": job_id})
        except Exception as exc:
            jobs.end_dispatched(platform, job_id, runner, f"Ray refused the submission: {exc}")
            raise

    def ray_status(self, job_id: str) -> str:
        """Ray's own status of the job's run (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        return str(self.client.get_job_status(submission_id(job_id)).value)

    def sync(self, platform: Platform, job_id: str) -> Job:
        """The job's row after reconciling it with Ray: a run that ended (failed to start, was stopped, crashed)
        without finishing the job leaves it ``failed`` (``cancelled`` if a cancel was asked) with Ray's reason."""
        status = self.ray_status(job_id)
        if status in RAY_TERMINAL:
            info = self.client.get_job_info(submission_id(job_id))
            jobs.end_dispatched(platform, job_id, self.runner_id(job_id),
                                f"Ray job {submission_id(job_id)} ended {status}: {info.message or 'no message'}")
        return jobs.get_job(platform, job_id)

    def cancel(self, platform: Platform, job_id: str) -> Job:
        """Cancel in the database (queued: at once; running: the flag) and stop the Ray job."""
        jobs.cancel_job(platform, job_id)
        if self.ray_status(job_id) not in RAY_TERMINAL:
            self.client.stop_job(submission_id(job_id))
        return jobs.get_job(platform, job_id)

    def logs(self, job_id: str) -> str:
        """The Ray job's stdout/stderr (the entrypoint's; the job's own log is ``jobs.job_log``)."""
        return str(self.client.get_job_logs(submission_id(job_id)))
