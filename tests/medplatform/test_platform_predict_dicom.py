"""A predict job over a dataset of DICOM images writes, next to each PNG mask, an anonymised DICOM SEG of the same
mask that references its source instance; a PNG image gets the PNG only."""

from __future__ import annotations

import io
import zipfile

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image

from core.phantoms import write_dataset
from medplatform import jobs
from medplatform.datasets import ingest_zip
from medplatform.worker import WorkerSettings, serve
from tests.support.artifact_factory import session_tiny_artifacts
from tests.support.bad_inputs import dicom_bytes
from tests.support.platform_jobs_fixtures import open_test_platform, platform_env

PATIENT_NAME = "Quixotewald^Dulcinea"
DICOM_CASES = ["0000", "0001", "0002", "0003"]
PNG_CASE = "0004"


def _dataset_zip(folder) -> tuple[bytes, dict[str, str]]:
    """Five 64 px phantom cases: the first four images as DICOM (with a patient name), the last as PNG; masks PNG.
    Returns the ZIP and each DICOM case's SOPInstanceUID."""
    write_dataset("ultrasound", len(DICOM_CASES) + 1, folder, seed=7, size=64)
    buffer, uids = io.BytesIO(), {}
    with zipfile.ZipFile(buffer, "w") as zf:
        for case in [*DICOM_CASES, PNG_CASE]:
            image = folder / "images" / f"{case}.png"
            if case in DICOM_CASES:
                data = dicom_bytes(pixels=np.asarray(Image.open(image).convert("L")), patient_name=PATIENT_NAME,
                                   patient_id=f"PID-{case}")
                uids[case] = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
                zf.writestr(f"images/{case}.dcm", data)
            else:
                zf.write(image, f"images/{case}.png")
            zf.write(folder / "masks" / f"{case}.png", f"masks/{case}.png")
    return buffer.getvalue(), uids


def test_predict_writes_an_anonymised_dicom_seg_per_dicom_case(tmp_path, tmp_path_factory):
    platform = open_test_platform(platform_env(tmp_path))
    data, uids = _dataset_zip(tmp_path / "phantoms")
    dataset = ingest_zip(platform, "dicom-phantoms", data)  # deidentify off: the stored sources keep the name
    assert dataset.status == "ready", dataset.error
    tiny = session_tiny_artifacts(tmp_path_factory)
    platform.registry.register(tiny.run_dir, tiny.art_dir, name="tinyseg")
    job = jobs.submit_job(platform, "predict", dataset.id, "tinyseg:1")
    assert serve(platform, WorkerSettings(heartbeat_s=1, poll_s=0.1, device="cpu"), max_jobs=1) == 1

    done = jobs.get_job(platform, job.id)
    assert done.status == "succeeded", done.error
    assert done.result["dicom_seg"] == {"written": len(DICOM_CASES), "skipped": {}}
    with zipfile.ZipFile(io.BytesIO(platform.blobs.get_bytes(done.result["predictions"]))) as zf:
        assert sorted(zf.namelist()) == sorted([f"masks/{c}.png" for c in [*DICOM_CASES, PNG_CASE]]
                                               + [f"masks/{c}.seg.dcm" for c in DICOM_CASES])
        foreground = 0
        for case in DICOM_CASES:
            png = np.asarray(Image.open(io.BytesIO(zf.read(f"masks/{case}.png")))) > 0
            raw = zf.read(f"masks/{case}.seg.dcm")
            dataset_seg = pydicom.dcmread(io.BytesIO(raw))
            seg = hd.seg.Segmentation.from_dataset(dataset_seg)
            pixels = seg.get_pixels_by_source_instance([uids[case]], segment_numbers=[1])
            np.testing.assert_array_equal(pixels[0, :, :, 0] > 0, png, err_msg=f"case {case}")
            assert str(dataset_seg.PatientName) == "" and dataset_seg.PatientID == ""
            assert dataset_seg.PatientIdentityRemoved == "YES"
            assert PATIENT_NAME.split("^")[0].encode() not in raw
            foreground += int(png.sum())
        assert foreground > 0  # the masks compared are not all empty
