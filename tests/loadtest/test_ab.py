"""loadtest.ab: variant and step parsing and the medians over interleaved rounds (no servers started)."""

from __future__ import annotations

import pytest

from loadtest.ab import parse_step, parse_variant, step_medians


def test_variant_names_server_code_and_environment():
    v = parse_variant("fast=server=ours,ref=HEAD~1,MEDREFINE_MAX_LATENCY_MS=0,MEDREFINE_INFERENCE_LANES=2")
    assert (v.name, v.server, v.ref, v.code) == ("fast", "ours", "HEAD~1", None)
    assert v.env == {"MEDREFINE_MAX_LATENCY_MS": "0", "MEDREFINE_INFERENCE_LANES": "2"}
    k = parse_variant("peer=server=kserve,code=/tmp/tree")
    assert (k.server, k.code, k.env) == ("kserve", "/tmp/tree", {})
    assert parse_variant("plain=").server == "ours"


@pytest.mark.parametrize("text, needle", [("=server=ours", "NAME"), ("x=server=triton", "triton"),
                                          ("x=MEDREFINE_A", "not key=value")])
def test_bad_variants_are_refused_naming_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_variant(text)


def test_steps():
    closed, fixed, poisson = parse_step("closed:8"), parse_step("open:12.5"), parse_step("poisson:3")
    assert (closed.mode, closed.concurrency) == ("closed", 8)
    assert (fixed.mode, fixed.rate_rps, fixed.arrival) == ("open", 12.5, "fixed")
    assert (poisson.arrival, poisson.rate_rps) == ("poisson", 3.0)
    with pytest.raises(ValueError, match="closed:C"):
        parse_step("burst:3")


def test_medians_over_rounds_and_cpu_per_request():
    def step(rps, p50, p99, server_cores, errors=0):
        return {"throughput_rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors,
                "cpu": {"server_cores": server_cores, "other_cores": 1.0}}

    runs = [step(10.0, 50.0, 90.0, 0.2), step(20.0, 40.0, 300.0, 0.5, errors=1), step(30.0, 45.0, 100.0, 0.6)]
    m = step_medians(runs)
    assert m["rounds"] == 3 and m["errors"] == 1
    assert (m["throughput_rps"], m["p50_ms"], m["p99_ms"], m["server_cores"]) == (20.0, 45.0, 100.0, 0.5)
    assert m["server_cpu_ms_per_request"] == pytest.approx(20.0)  # median of 20, 25 and 20 ms
