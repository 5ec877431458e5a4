"""`python -m export verify`: hashes, version, parity re-run from the source run, structural fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export import graphs as graphs_mod
from export.__main__ import main
from export.graphs import build_graph_specs, save_random_run
from export.onnx_export import export_artifacts, export_graph
from export.verify import verify_artifacts
from inference.manifest import (
    ArtifactError,
    compute_version,
    load_manifest,
    sha256_file,
    write_manifest,
)
from weights.checkpoints import build_model_from_run, load_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    run_dir = save_random_run("tiny", root / "run")
    art = root / "art"
    export_artifacts(run_dir, art, only=["transunet", "mask_decoder"])
    return run_dir, art


@pytest.fixture
def art_copy(exported, tmp_path) -> Path:
    copy = tmp_path / "art"
    shutil.copytree(exported[1], copy)
    return copy


def test_verify_reruns_parity_from_the_source_run(exported, capsys):
    _, art = exported
    assert main(["verify", str(art)]) == 0
    out = capsys.readouterr().out
    assert "(parity check)" in out and "transunet: ok max abs err" in out and "mask_decoder: ok" in out


def test_flipped_byte_is_named_and_exits_nonzero(art_copy, capsys):
    path = art_copy / "transunet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["verify", str(art_copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: sha256 mismatch")


def test_missing_graph_and_missing_manifest(art_copy, capsys):
    (art_copy / "mask_decoder.onnx").unlink()
    assert main(["verify", str(art_copy)]) == 1
    assert f"{art_copy / 'mask_decoder.onnx'}: missing" in capsys.readouterr().err
    (art_copy / "manifest.json").unlink()
    assert main(["verify", str(art_copy)]) == 1
    assert f"{art_copy / 'manifest.json'}: missing" in capsys.readouterr().err


def test_edited_pipeline_changes_the_version_and_fails(art_copy):
    manifest = load_manifest(art_copy)
    manifest["pipeline"]["threshold"] = 0.9
    write_manifest(art_copy, manifest)
    with pytest.raises(ArtifactError, match="manifest.json: field 'version'"):
        verify_artifacts(art_copy)


def test_structural_check_when_the_run_is_gone(art_copy, tmp_path, capsys):
    manifest = load_manifest(art_copy)
    manifest["source"]["run_dir"] = str(tmp_path / "deleted-run")  # not part of the version
    write_manifest(art_copy, manifest)
    assert main(["verify", str(art_copy)]) == 0
    out = capsys.readouterr().out
    assert "structural check only: source run" in out and "(structural check)" in out
    report = verify_artifacts(art_copy)
    assert report.mode == "structural" and set(report.graphs) == {"transunet", "mask_decoder"}


def test_structural_flag_skips_the_parity_rerun(exported):
    assert verify_artifacts(exported[1], rerun_parity=False).mode == "structural"


def test_structural_check_catches_a_graph_that_lost_an_output(art_copy):
    import onnx

    model = onnx.load(str(art_copy / "mask_decoder.onnx"))
    del model.graph.output[2]  # drop low_res_masks
    onnx.save(model, str(art_copy / "mask_decoder.onnx"))
    manifest = load_manifest(art_copy)
    manifest["graphs"]["mask_decoder"]["sha256"] = sha256_file(art_copy / "mask_decoder.onnx")
    manifest["version"] = compute_version({n: g["sha256"] for n, g in manifest["graphs"].items()},
                                          manifest["pipeline"])
    write_manifest(art_copy, manifest)
    with pytest.raises(ArtifactError, match=r"mask_decoder.onnx: outputs are .* manifest says"):
        verify_artifacts(art_copy, rerun_parity=False)


def test_consistently_replaced_wrong_graph_fails_the_parity_rerun(exported, art_copy, monkeypatch, capsys):
    """A wrong graph spliced in with matching hashes and version passes the byte checks; the parity re-run
    from the source run catches it."""
    run_dir, _ = exported
    info = load_run(run_dir)
    spec = next(s for s in build_graph_specs(build_model_from_run(info), info) if s.name == "transunet")
    monkeypatch.setattr(graphs_mod.TransUNetGraph, "forward", lambda self, image: self.transunet(image) * 1.5)
    export_graph(spec.module, spec.example, art_copy / "transunet.onnx", output_names=spec.output_names,
                 dynamic_axes=spec.dynamic_axes)
    manifest = load_manifest(art_copy)
    manifest["graphs"]["transunet"]["sha256"] = sha256_file(art_copy / "transunet.onnx")
    manifest["version"] = compute_version({n: g["sha256"] for n, g in manifest["graphs"].items()},
                                          manifest["pipeline"])
    write_manifest(art_copy, manifest)
    assert main(["verify", str(art_copy), "--structural"]) == 0  # bytes and structure are consistent
    capsys.readouterr()
    assert main(["verify", str(art_copy)]) == 1
    err = capsys.readouterr().err
    assert f"{art_copy / 'transunet.onnx'}: ONNX Runtime disagrees with torch" in err


def test_malformed_manifest(art_copy):
    (art_copy / "manifest.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ArtifactError, match="field 'format' is 'other/1'"):
        verify_artifacts(art_copy)
    (art_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        verify_artifacts(art_copy)
