"""Locust users for the medrefine service: REST ``POST /segment`` and OIP ``POST /v2/models/segment/infer``."""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from pathlib import Path

import gevent
from locust import HttpUser, events, task
from locust.exception import StopUser

try:
    import loadtest  # noqa: F401
except ImportError:  # locust puts only this file's folder on sys.path; the package lives one level up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.http_load import OIP_MODEL, SEGMENT_PATH, oip_infer_body, require_loopback
from loadtest.workload import Workload

logger = logging.getLogger("medrefine.locust")

_COUNTER = itertools.count()
_STATE: dict[str, object] = {"issued": 0, "finished": 0, "workload": None}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--medrefine-rate", type=float, default=0.0, env_var="MEDREFINE_LOAD_RATE",
                        help="open loop: total requests/s over all users (0: closed loop)")
    parser.add_argument("--medrefine-arrival", choices=("poisson", "fixed"), default="poisson",
                        env_var="MEDREFINE_LOAD_ARRIVAL", help="open-loop gaps")
    parser.add_argument("--medrefine-max-requests", type=int, default=0, env_var="MEDREFINE_LOAD_MAX_REQUESTS",
                        help="stop after this many requests (0: no cap)")
    parser.add_argument("--medrefine-image-size", type=int, default=256, env_var="MEDREFINE_LOAD_IMAGE_SIZE",
                        help="side of the square request images")


@events.test_start.add_listener
def _loopback_only(environment, **kwargs) -> None:
    try:
        require_loopback(environment.host or "")
    except ValueError as exc:
        logger.error("refusing to run: %s", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)  # not from the runner's own greenlet


def _workload(environment) -> Workload:
    if _STATE["workload"] is None:
        _STATE["workload"] = Workload(size=environment.parsed_options.medrefine_image_size)
    return _STATE["workload"]  # type: ignore[return-value]


def _admit(environment) -> int:
    """The next request index; once the request cap is reached this user stops (raises StopUser)."""
    cap = environment.parsed_options.medrefine_max_requests
    if cap and _STATE["issued"] >= cap:
        raise StopUser()
    _STATE["issued"] = int(_STATE["issued"]) + 1
    return next(_COUNTER)


def _finish(environment) -> None:
    """Count one answered request; the run quits after the last capped request is answered and recorded.

    Quitting when the cap is first reached would kill the other users' greenlets mid-request, so their
    admitted requests would never reach the stats.
    """
    _STATE["finished"] = int(_STATE["finished"]) + 1
    cap = environment.parsed_options.medrefine_max_requests
    if cap and _STATE["finished"] >= cap and environment.runner is not None and not _STATE.get("quitting"):
        _STATE["quitting"] = True
        gevent.spawn(environment.runner.quit)  # not from this user's greenlet: quit() kills it


class _MedrefineUser(HttpUser):
    """Closed loop by default; with ``--medrefine-rate`` each user follows its share of the arrival rate."""

    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        users = max(1, int(options.num_users or 1))
        self._rate = options.medrefine_rate / users if options.medrefine_rate > 0 else 0.0
        self._poisson = options.medrefine_arrival == "poisson"
        self._rng = random.Random(id(self))
        self._next_at = time.monotonic()
        _workload(self.environment)

    def wait_time(self) -> float:
        if self._rate <= 0:
            return 0.0
        self._next_at += self._rng.expovariate(self._rate) if self._poisson else 1.0 / self._rate
        return max(0.0, self._next_at - time.monotonic())


class RestUser(_MedrefineUser):
    """``POST /segment`` with a PNG upload in the multipart field ``file``."""

    @task
    def segment(self) -> None:
        index = _admit(self.environment)
        png = _workload(self.environment).png(index)
        try:
            with self.client.post(SEGMENT_PATH, files={"file": ("image.png", png, "image/png")},
                                  name="POST /segment", catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
        finally:
            _finish(self.environment)


class OipHttpUser(_MedrefineUser):
    """``POST /v2/models/segment/infer``: IMAGE UINT8 [H, W] as binary tensor data, MASK back binary."""

    @task
    def infer(self) -> None:
        index = _admit(self.environment)
        body, headers = oip_infer_body(_workload(self.environment).image(index))
        try:
            with self.client.post(f"/v2/models/{OIP_MODEL}/infer", data=body, headers=headers,
                                  name=f"POST /v2/models/{OIP_MODEL}/infer", catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
        finally:
            _finish(self.environment)
