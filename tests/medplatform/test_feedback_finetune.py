"""The corrections loop end to end on a real server with one job worker, on a tiny model: train tinyseg v1,
save corrections made against it (POST /feedback/segmentation), snapshot them, fine-tune (a train job with
``init``) -> tinyseg v2 registered from v1's weights, and /segment serves v2. The server log stays free of the
feedback dataset's name, the uploaded file names and a DICOM's patient name (not stored either)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from core.imageio import encode_mask_png, encode_png
from core.phantoms import breast_ultrasound
from loadtest.corrections import wait_job
from tests.support.platform_fixtures import folder_members, phantom_folder
from tests.support.service_fixtures import start_server

ADMIN_KEY = "admin-key-0123456789"
MODEL = "tinyfb"
JOB_TIMEOUT_S = 420.0  # two tiny train jobs' worth of work on two busy cores
SECRET_DATASET = "ward-Smith-feedback"
SECRET_FILE = "Doe_John_1970-01-01.png"


@pytest.fixture(scope="module")
def server(service_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback_finetune")
    env = {"MEDREFINE_ADMIN_KEY": ADMIN_KEY, "MEDREFINE_CACHE_DIR": str(root / "cache"),
           "MEDREFINE_PLATFORM_WORKERS": "1", "MEDREFINE_JOB_HEARTBEAT_S": "1", "MEDREFINE_JOB_POLL_S": "0.2",
           "MEDREFINE_JOB_DEVICE": "cpu"}
    process = start_server(service_artifacts.art_dir, root / "server", env=env)
    yield process
    process.stop()


def _admin(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def _wait_job(client, job_id: str, headers) -> dict:
    return wait_job(client, job_id, headers, timeout_s=JOB_TIMEOUT_S, poll_s=1.0)


def test_corrections_fine_tune_a_new_version_that_serves(server, tmp_path):
    admin = _admin(server)
    with server.client(timeout=120.0) as client:
        # 1. tinyseg v1 from an 8-case phantom ZIP
        members = folder_members(phantom_folder(tmp_path / "us", n=8, size=64, seed=5))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        upload = client.post("/datasets", headers=admin, files={"file": ("us.zip", buffer.getvalue())})
        assert upload.status_code == 201, upload.text
        first = client.post("/jobs", headers=admin, json={
            "kind": "train", "dataset": upload.json()["id"], "recipe": MODEL,
            "hyperparameters": {"preset": "tiny", "epochs": 1, "batch_size": 4}})
        assert first.status_code == 202, first.text
        job = _wait_job(client, first.json()["id"], admin)
        assert job["status"] == "succeeded", job["error"]

        # 2. five corrections made against v1, into a named feedback dataset
        sent = []
        for seed in range(40, 45):
            image, mask = breast_ultrasound(seed, size=64)
            sent.append(mask.astype(np.uint8))
            saved = client.post("/feedback/segmentation", headers=admin, data={
                "model_version": f"{MODEL}:1", "seconds": "20", "prompts": "2", "dataset": SECRET_DATASET},
                files={"image": (SECRET_FILE, encode_png(image), "image/png"),
                       "mask": ("mask.png", encode_mask_png(mask), "image/png")})
            assert saved.status_code == 201, saved.text

        # 3. snapshot -> dataset; fine-tune from v1
        snap = client.post("/feedback/segmentation/snapshot", headers=admin, json={"dataset": SECRET_DATASET})
        assert snap.status_code == 201 and snap.json()["cases"] == 5, snap.text
        refused = client.post("/jobs", headers=admin, json={
            "kind": "train", "dataset": snap.json()["id"], "recipe": MODEL,
            "hyperparameters": {"init": f"{MODEL}:7"}})
        assert refused.status_code == 404 and refused.json()["field"] == "hyperparameters.init"
        promoted = client.put(f"/models/{MODEL}/aliases/production", headers=admin, json={"version": 1})
        assert promoted.status_code == 200, promoted.text
        tune = client.post("/jobs", headers=admin, json={
            "kind": "train", "dataset": snap.json()["id"], "recipe": MODEL,
            "hyperparameters": {"init": f"{MODEL}@production", "epochs": 1,
                                "batch_size": 2}})
        assert tune.status_code == 202, tune.text
        assert tune.json()["hyperparameters"]["phases"] == ["e2e"]
        assert tune.json()["hyperparameters"]["init"] == f"{MODEL}:1"  # the alias pinned at submit
        job = _wait_job(client, tune.json()["id"], admin)
        assert job["status"] == "succeeded", (job["error"], client.get(f"/jobs/{job['id']}/logs", headers=admin).text)
        assert job["result"]["model"] == MODEL and job["result"]["version"] == 2
        log = client.get(f"/jobs/{job['id']}/logs", headers=admin).text
        assert f"fine-tune from {MODEL}:1 (preset tiny)" in log and "e2e epoch 1/1" in log

        # 4. v2 is registered like any other version, with its origin
        version = client.get(f"/models/{MODEL}/versions/2", headers=admin).json()
        assert version["hyperparameters"]["init"] == f"{MODEL}:1"
        assert version["dataset_id"] == snap.json()["id"] and version["metrics"]["source"] == "evaluation"

        # 5. it serves: /segment with model=tinyfb:2 answers a mask of the image's size
        image, _ = breast_ultrasound(99, size=64)
        answer = client.post("/segment", data={"model": f"{MODEL}:2", "outputs": "mask"},
                             files={"file": ("x.png", encode_png(image), "image/png")})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == f"{MODEL}:2"
        import base64

        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["mask_png_base64"]))))
        assert served.shape == (64, 64) and set(np.unique(served)) <= {0, 255}

        # 6. a DICOM correction (another feedback dataset): its patient name reaches neither the store nor the log
        import pydicom
        from pydicom.data import get_testdata_file

        source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        source.PatientName = "Doe^Jane^Feedback"
        dicom = io.BytesIO()
        source.save_as(dicom)
        mask = np.zeros((source.Rows, source.Columns), np.uint8)
        mask[40:60, 30:50] = 1
        saved = client.post("/feedback/segmentation", headers=admin, data={
            "model_version": f"{MODEL}:2", "seconds": "5", "prompts": "0", "dataset": "dicom-check"},
            files={"image": ("ct.dcm", dicom.getvalue(), "application/dicom"),
                   "mask": ("mask.png", encode_mask_png(mask), "image/png")})
        assert saved.status_code == 201, saved.text
        stored = client.get(f"/feedback/segmentation/{saved.json()['id']}/image", headers=admin).content
        assert b"Doe^Jane" not in stored and pydicom.dcmread(io.BytesIO(stored)).PatientIdentityRemoved == "YES"

    # v2's run was initialised from v1's (the e2e phase records its source)
    from medplatform.context import open_platform
    from medplatform.registry import run_prefix

    platform = open_platform(server.env, migrate=False)
    info = platform.registry.get_version(MODEL, 2)
    run = json.loads(platform.blobs.get_bytes(run_prefix(MODEL, info.artifact_hashes["weights_sha256"]) + "run.json"))
    assert list(run["sources"]) == ["ultrarefiner"] and run["phase"] == "e2e"
    text = server.log()
    assert SECRET_DATASET not in text and SECRET_FILE not in text and "Doe_John" not in text
    assert "Doe^Jane" not in text and "Jane" not in text
