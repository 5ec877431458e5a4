"""loadtest/capacity.py's queue simulation against closed forms: M/M/1 sojourn times and a saturated
closed loop, so the capacity plan extrapolates with a simulator that is right where theory is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.capacity import ReplicaModel, fleet_size, simulate_closed, simulate_open


def exponential_model(mean_s: float, n: int = 200_000) -> ReplicaModel:
    service = np.random.default_rng(3).exponential(mean_s, n)
    return ReplicaModel(delay_s=np.zeros(n), service_s=service)


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_open_loop_one_replica_matches_m_m_1(load):
    """M/M/1: the time in system is exponential with rate mu - lambda, so p99 = ln(100) / (mu - lambda)."""
    mu = 50.0
    result = simulate_open(exponential_model(1 / mu), replicas=1, rate_rps=load * mu, requests=200_000)
    assert result["p99_ms"] == pytest.approx(1000 * math.log(100) / (mu - load * mu), rel=0.08)
    assert result["utilisation"] == pytest.approx(load, rel=0.01)


def test_closed_loop_saturates_at_replicas_over_service_time():
    model = ReplicaModel(delay_s=np.full(100, 0.010), service_s=np.full(100, 0.020))
    one = simulate_closed(model, replicas=1, clients=1, requests=2_000)
    assert one["throughput_rps"] == pytest.approx(1 / 0.030, rel=1e-6)  # D + S per request, no queue
    assert one["p99_ms"] == pytest.approx(30.0, rel=1e-6)
    busy = simulate_closed(model, replicas=2, clients=16, requests=4_000)
    assert busy["throughput_rps"] == pytest.approx(2 / 0.020, rel=0.01)  # two queues, never idle
    assert busy["p99_ms"] == pytest.approx(1000 * 16 * 0.020 / 2, rel=0.1)  # Little: N / X


def test_fleet_size_meets_the_target_with_the_fewest_replicas():
    model = exponential_model(0.020)
    fleet = fleet_size(model, 500.0, p99_ms=200.0)
    assert fleet["p99_ms"] < 200.0
    fewer = simulate_open(model, replicas=fleet["replicas"] - 1, rate_rps=500.0)
    assert fewer["p99_ms"] >= 200.0 or fewer["utilisation"] > 0.95
