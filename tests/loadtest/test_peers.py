"""The serving peers of ``make bench``: they answer with our masks, and the comparison reads them right.

The BentoML peer runs for real (``bentoml serve`` on 127.0.0.1 over tiny artifacts). The KServe peer
needs ``kserve``, which lives only in its own virtual environment (its pins clash with ours), so here
its shared parts are tested: the image conversion, the pipeline call and the venv's pins.
"""

from __future__ import annotations

import base64
import io
import json
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from core.metrics import dice
from loadtest import bench
from loadtest.peers.common import load_pipeline, model_side, segment_masks, to_unit
from loadtest.peers.compare import markdown_table, plot_servers, verdict
from loadtest.peers.kserve_venv import requirements, venv_dir
from loadtest.peers.launch import launch_peer
from loadtest.tenants import instruction_sets
from loadtest.workload import _png
from tests.support.artifact_factory import session_tiny_artifacts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_tiny_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline(tiny):
    return load_pipeline(tiny.art_dir, threads=1)


def _phantom(seed: int, height: int, width: int) -> np.ndarray:
    from core.phantoms import breast_ultrasound

    image, _ = breast_ultrasound(seed, size=max(height, width))
    return np.ascontiguousarray(image[:height, :width].astype(np.uint8))



def test_to_unit_is_what_our_rest_decoder_gives():
    from core.imageio import decode_image

    image = _phantom(3, 40, 56)
    np.testing.assert_array_equal(to_unit(image), decode_image(_png(image)).pixels)
    with pytest.raises(ValueError, match="uint8"):
        to_unit(image.astype(np.float32))


def test_bentoml_idiomatic_answers_the_offline_pipelines_masks(tiny, pipeline, tmp_path):
    side = model_side(tiny.art_dir)
    peer = launch_peer("bentoml-idiomatic", tiny.art_dir, threads=1, max_batch_size=4, work=tmp_path,
                       thread_env=bench.thread_env(1), startup_timeout_s=120)
    square = [_phantom(seed, side, side) for seed in range(3)]
    odd = _phantom(7, side - 24, side + 16)  # resized to S x S before the batchable call, the mask resized back
    expected = segment_masks(pipeline, [to_unit(image) for image in square])
    assert all(m.sum() > 0 for m in expected)  # non-empty masks, or the comparison says little
    resized = np.asarray(Image.fromarray(odd).resize((side, side), Image.Resampling.BILINEAR))
    odd_mask = segment_masks(pipeline, [to_unit(resized)])[0]
    expected.append(np.asarray(Image.fromarray(odd_mask * 255).resize(odd.shape[::-1], Image.Resampling.NEAREST)))
    with peer.server, httpx.Client(base_url=peer.urls["rest"], timeout=60) as client:
        masks = []
        for index, image in enumerate([*square, odd]):
            response = client.post("/segment", files={"file": (f"p{index}.png", _png(image), "image/png")})
            assert response.status_code == 200, response.text
            body = response.json()
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"])))) > 0
            assert (body["height"], body["width"]) == image.shape == mask.shape
            masks.append(mask)
    for got, want in zip(masks, expected, strict=True):  # same graphs, same input: the same mask
        assert dice(got != 0, want != 0) == 1.0
        np.testing.assert_array_equal(got, want.astype(bool))


def test_kserve_pipeline_call_and_venv_pins(pipeline, tiny, monkeypatch, tmp_path):
    from importlib.metadata import version

    image = _phantom(1, 96, 80)  # what KServe's predict does with an IMAGE tensor
    mask = segment_masks(pipeline, [to_unit(image)])[0]
    want = pipeline.segment([to_unit(image)])[0].mask
    assert mask.dtype == np.uint8 and mask.shape == image.shape
    np.testing.assert_array_equal(mask, want)
    lines = requirements()
    assert lines[0] == "kserve==0.21.0"
    assert f"numpy=={version('numpy')}" in lines and f"onnxruntime=={version('onnxruntime')}" in lines
    assert f"torch=={version('torch')}" in lines
    monkeypatch.setenv("MEDREFINE_PEER_VENVS", str(tmp_path))
    assert venv_dir() == tmp_path / "kserve-0.21.0"


def _curve(peak: float, p99_at_70: float) -> dict:
    cpu = {"server_cores": 1.0, "loader_cores": 0.0, "other_cores": 0.1, "machine_cores": 1.1, "cores": 2.0}
    return {
        "closed": [{"throughput_rps": peak, "concurrency": 8, "cpu": cpu}],
        "open": [{"fraction_of_peak": f, "offered_rps": f * peak, "throughput_rps": f * peak, "p50_ms": 20.0,
                  "p99_ms": p99_at_70 * f / 0.7, "error_rate": 0.0, "cpu": cpu} for f in (0.3, 0.7)],
        "peak_throughput_rps": peak, "peak_concurrency": 8, "peak_throughput_per_server_core": peak,
        "at_70pct": {"p99_ms": p99_at_70},
    }


def _document(ours_rest: float, ours_grpc: float) -> dict:
    return {
        "served": {"settings": {}, "rest": _curve(ours_rest, 100.0), "grpc": _curve(ours_grpc, 90.0)},
        "naive": _curve(20.0, 300.0),
        "peers": {"bentoml-idiomatic": {"curves": {"rest": _curve(40.0, 150.0)}},
                  "kserve": {"curves": {"oip-http": _curve(44.0, 80.0), "grpc": _curve(46.0, 120.0)}}},
        "machine": {"cpu_model": "test CPU", "logical_cores": 2}, "config": {"threads": 1},
        "machine_load": {"other_tenants_cores_mean": 0.1}, "created": "2026-01-01T00:00:00+00:00",
    }


def test_verdict_compares_ours_with_the_best_peer_per_protocol_family(tmp_path):
    result = verdict(_document(ours_rest=60.0, ours_grpc=62.0))
    assert result["ours_over_best_peer_rest"] == pytest.approx(60.0 / 44.0)  # KServe's OIP-HTTP is the best REST peer
    assert result["best_peer"]["rest"]["server"] == "kserve"
    assert result["ours_over_best_peer_grpc"] == pytest.approx(62.0 / 46.0)
    assert result["p99_ms_at_70pct_rest"] == 100.0 and result["p99_ms_at_70pct_grpc"] == 90.0
    assert result["goal"]["rest"]["met"] is False  # 1.36 x, but p99 100 ms against the peer's 80 ms
    assert result["goal"]["grpc"]["met"] is True  # 1.35 x and 90 ms <= 120 ms
    # every synthetic server used one core at its peak, so per CPU-second equals the peak ratio
    assert result["goal"]["rest"]["ours_over_best_peer_per_server_cpu_s"] == pytest.approx(60.0 / 44.0)
    assert verdict(_document(ours_rest=50.0, ours_grpc=62.0))["goal"]["grpc"]["met"] is True
    assert {(r["server"], r["protocol"]) for r in result["servers"]} == {
        ("ours", "rest"), ("ours", "grpc"), ("naive-torch", "rest"), ("bentoml-idiomatic", "rest"),
        ("kserve", "oip-http"), ("kserve", "grpc")}
    table = markdown_table(_document(60.0, 62.0)).splitlines()
    assert len(table) == 2 + 6
    assert "| kserve | oip-http | 44.0 | 1.00 | 44.0 | 20 / 34 | 20 / 80 | – | 1.36 |" in table  # 60 / 44
    plot = plot_servers(_document(60.0, 62.0), tmp_path / "servers.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimized_keys_come_from_the_newest_optimisation_results(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    empty = bench.optimized_figures()
    assert empty["source"] is None and all(empty[k] is None for k in bench.OPTIMIZED_KEYS)
    old = {"created": "2026-01-01T00:00:00+00:00", "optimized_over_fp32_offline_b1": 1.2,
           "optimized_over_fp32_offline_b16": 1.1, "optimized_heldout_dice_delta": 0.001}
    new = {**old, "created": "2026-02-01T00:00:00+00:00", "optimized_over_fp32_offline_b1": 1.6}
    (tmp_path / "optimize-b.json").write_text(json.dumps(old))
    (tmp_path / "optimize-a.json").write_text(json.dumps(new))
    found = bench.optimized_figures()
    assert found["source"] == "optimize-a.json" and found["optimized_over_fp32_offline_b1"] == 1.6
    assert bench.optimized_figures(tmp_path / "optimize-b.json")["optimized_over_fp32_offline_b1"] == 1.2
    with pytest.raises(ValueError, match="optimized-results"):
        bench.optimized_figures(tmp_path / "missing.json")


def test_bench_cli_refuses_an_unknown_peer(capsys):
    from loadtest.__main__ import main

    assert main(["bench", "--peers", "bentoml-idiomatic,triton"]) == 2
    assert "triton" in capsys.readouterr().err


def test_instruction_sets_from_cpuinfo():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni\n"
    assert instruction_sets(cpuinfo) == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    assert instruction_sets("processor : 0\n") == []
    assert sys.platform != "linux" or instruction_sets()  # this machine's own flags are read
