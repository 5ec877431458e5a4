"""The platform's HTTP API on a real server (tests/service_fixtures.start_server): the README's curl walk-through
from a ZIP upload to a promoted version, the admin key, and refusals mapped by type (400 naming the field, 409)."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support.platform_fixtures import folder_members, phantom_folder, zip_bytes
from tests.support.service_fixtures import TEST_API_KEY, ServerProcess, start_server

ADMIN_KEY = "admin-key-0123456789"
MODEL = "phantom-us"
DATASET_MAX_BYTES = 4 * 1024 * 1024  # below the guard's 20 MiB, so this layer's own limit is what answers
JOB_TIMEOUT_S = 300.0  # a tiny three-phase train + evaluate + ONNX export on two busy cores


@pytest.fixture(scope="module")
def server(service_artifacts, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("platform_api")
    env = {"MEDREFINE_DATA_DIR": str(root / "data"), "MEDREFINE_ADMIN_KEY": ADMIN_KEY,
           "MEDREFINE_CACHE_DIR": str(root / "cache"), "MEDREFINE_PLATFORM_WORKERS": "1",
           "MEDREFINE_JOB_HEARTBEAT_S": "1", "MEDREFINE_JOB_POLL_S": "0.2", "MEDREFINE_JOB_DEVICE": "cpu",
           "MEDREFINE_DATASET_MAX_BYTES": str(DATASET_MAX_BYTES)}
    process = start_server(service_artifacts.art_dir, root / "server", env=env)
    yield process
    process.stop()


def _client(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120.0)


@pytest.fixture(scope="module")
def phantom_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """8 ultrasound phantoms of 64 px (core.phantoms) as images/ + masks/ in a ZIP."""
    folder = phantom_folder(tmp_path_factory.mktemp("phantoms") / "us", n=8, size=64, seed=5)
    return zip_bytes(folder_members(folder))


def _events(lines: list[str]) -> list[tuple[str, str]]:
    """(event, data) pairs of server-sent-event lines; comments (``: ...``) skipped."""
    out, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                out.append((event, "\n".join(data)))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return out


def _first_events(server: ServerProcess, job_id: str, count: int, timeout_s: float = 60.0) -> list[tuple[str, str]]:
    """Read the job's event stream until ``count`` events arrived (or it ended), then hang up."""
    lines: list[str] = []
    with _client(server, TEST_API_KEY) as client, \
            client.stream("GET", f"/jobs/{job_id}/events", timeout=timeout_s) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if line == "" and len(_events(lines)) >= count:
                break
    return _events(lines)


def test_zip_to_promoted_version(server: ServerProcess, phantom_zip: bytes):
    admin, reader, anonymous = _client(server, ADMIN_KEY), _client(server, TEST_API_KEY), _client(server, None)
    upload = {"file": ("us.zip", phantom_zip, "application/zip")}

    # 1. Upload: the admin key is needed (the inference key is not enough); the same content again is one dataset.
    assert anonymous.post("/datasets", files=upload).status_code == 401
    assert reader.post("/datasets", files=upload).status_code == 401
    created = admin.post("/datasets", files=upload, data={"name": "phantom ultrasound"})
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["status"] == "ready" and dataset["stats"]["pairs"] == 8 and dataset["name"] == "phantom ultrasound"
    again = admin.post("/datasets", files=upload)
    assert again.status_code == 200 and again.json()["id"] == dataset["id"]

    # 2. Read it back: reads need the inference key; thumbnails are PNGs of the size asked.
    assert anonymous.get("/datasets").status_code == 401
    assert [d["id"] for d in reader.get("/datasets").json()] == [dataset["id"]]
    detail = reader.get(f"/datasets/{dataset['id']}", params={"thumbnails": 2, "size": 32}).json()
    assert detail["stats"]["max_hw"] == [64, 64] and len(detail["thumbnails"]) == 2
    png = base64.b64decode(detail["thumbnails"][0]["png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert reader.get("/datasets/0123456789abcdef0123456789abcdef").status_code == 404

    # 3. Train: bad hyperparameters name the field; a good job is 202 with its id.
    job_body = {"kind": "train", "dataset": dataset["id"], "recipe": MODEL,
                "hyperparameters": {"preset": "tiny", "epochs": 1, "phases": ["transunet", "refiner", "e2e"]}}
    bad = admin.post("/jobs", json={**job_body, "hyperparameters": {"epochs": -1}})
    assert bad.status_code == 400 and bad.json()["field"] == "hyperparameters.epochs"
    assert reader.post("/jobs", json=job_body).status_code == 401
    accepted = admin.post("/jobs", json=job_body)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert accepted.json()["status"] == "queued" and accepted.headers["location"] == f"/jobs/{job_id}"

    # 4. A dataset in use cannot be deleted; the job's events stream while it runs.
    refused = admin.delete(f"/datasets/{dataset['id']}")
    assert refused.status_code == 409 and refused.json()["field"] == "dataset"
    (event, data), = _first_events(server, job_id, 1)
    assert event == "job" and json.loads(data)["id"] == job_id

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := reader.get(f"/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job still {job['status']} after {JOB_TIMEOUT_S:.0f} s: {job}"
        time.sleep(1.0)
    assert job["status"] == "succeeded", (job, reader.get(f"/jobs/{job_id}/logs").text[-3000:])
    assert job["started_at"] and job["finished_at"] and job["result"]["version"] == 1
    assert "e2e" in reader.get(f"/jobs/{job_id}/logs").text
    finished = _first_events(server, job_id, 2)  # a finished job: its state, then the end
    assert [e for e, _ in finished] == ["job", "end"] and json.loads(finished[1][1]) == {"status": "succeeded"}

    # 5. The registry shows the version with its held-out metrics; promote it.
    assert MODEL in [m["name"] for m in reader.get("/models").json()]
    (version,) = reader.get(f"/models/{MODEL}/versions").json()
    assert version["version"] == 1 and isinstance(version["version"], int)
    assert 0.0 <= version["metrics"]["dice"] <= 1.0 and version["job_id"] == job_id
    assert reader.put(f"/models/{MODEL}/aliases/production", json={"version": 1}).status_code == 401
    promoted = admin.put(f"/models/{MODEL}/aliases/production", json={"version": 1})
    assert promoted.status_code == 200 and promoted.json()["aliases"] == ["production"]
    missing = admin.put(f"/models/{MODEL}/aliases/production", json={"version": 7})
    assert missing.status_code == 404 and missing.json()["field"] == "version"
    aliased = admin.delete(f"/models/{MODEL}/versions/1")  # refused while an alias points at it
    assert aliased.status_code == 409 and aliased.json()["field"] == "version"
    assert "production" in aliased.json()["error"]

    # 6. Segment an image with the promoted version (REST model=name@alias; loads it on first use).
    image = _members(phantom_zip)["images/0000.png"]
    segmented = reader.post("/segment", files={"file": ("x.png", image, "image/png")},
                            data={"model": f"{MODEL}@production"})
    assert segmented.status_code == 200, segmented.text
    assert segmented.json()["model"]["version"] == f"{MODEL}:1" and segmented.json()["shape"] == [64, 64]

    # 7. Nor while loaded, once the alias is gone; the dataset can go once no job uses it.
    assert admin.delete(f"/models/{MODEL}/aliases/production").status_code == 200
    loaded = admin.delete(f"/models/{MODEL}/versions/1")
    assert loaded.status_code == 409 and "loaded" in loaded.json()["error"]
    assert [v["version"] for v in reader.get(f"/models/{MODEL}/versions").json()] == [1]
    assert admin.delete(f"/datasets/{dataset['id']}").status_code == 200
    assert reader.get(f"/datasets/{dataset['id']}").status_code == 404
    for client in (admin, reader, anonymous):
        client.close()
    log = server.log()  # no file name or dataset name reached the server's log
    assert "platform ready" in log and not any(s in log for s in ("us.zip", "0000.png", "phantom ultrasound"))


def test_hostile_zip_refused_naming_the_entry(server: ServerProcess, phantom_zip: bytes):
    members = _members(phantom_zip)
    members["../../escape.png"] = members["images/0000.png"]
    with _client(server, ADMIN_KEY) as admin:
        response = admin.post("/datasets", files={"file": ("evil.zip", zip_bytes(members), "application/zip")})
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "file" and "../../escape.png" in response.json()["error"]
        listed = admin.get("/datasets").json()
    assert all(d["name"] != "evil" for d in listed)
    assert "escape.png" not in server.log() and "evil.zip" not in server.log()


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_refusals_by_type(server: ServerProcess, tmp_path: Path):
    with _client(server, ADMIN_KEY) as admin:
        unknown = admin.post("/jobs", json={"kind": "train", "dataset": "nope", "colour": "red"})
        assert unknown.status_code == 400 and unknown.json()["field"] == "colour"
        no_dataset = admin.post("/jobs", json={"kind": "train", "dataset": "0" * 32})
        assert no_dataset.status_code == 404 and no_dataset.json()["field"] == "dataset"
        too_large = admin.post("/datasets", files={"file": ("big.zip", b"\0" * (DATASET_MAX_BYTES + (2 << 20)))})
        assert too_large.status_code == 413 and too_large.json()["field"] == "file"
        wrong_type = admin.post("/datasets", content=b"x", headers={"content-type": "text/plain"})
        assert wrong_type.status_code == 415
        assert admin.get("/models/never-trained/versions").status_code == 404
        assert admin.get("/jobs/" + "f" * 32).status_code == 404


def test_admin_key_settings():
    from service.settings import ServiceSettings, SettingsError

    settings = ServiceSettings.from_env({"MEDREFINE_ADMIN_KEY": ADMIN_KEY, "MEDREFINE_API_KEY": TEST_API_KEY})
    assert settings.admin_key == ADMIN_KEY and ADMIN_KEY not in repr(settings)
    assert settings.public_dict()["admin_key"] == "set" and ServiceSettings.from_env(settings.to_env()) == settings
    with pytest.raises(SettingsError, match="MEDREFINE_ADMIN_KEY"):
        ServiceSettings.from_env({"MEDREFINE_ADMIN_KEY": TEST_API_KEY, "MEDREFINE_API_KEY": TEST_API_KEY})
    with pytest.raises(SettingsError, match="MEDREFINE_ADMIN_KEY"):
        ServiceSettings.from_env({"MEDREFINE_ADMIN_KEY": "short"})
    with pytest.raises(SettingsError, match="MEDREFINE_PLATFORM_WORKERS"):
        ServiceSettings.from_env({"MEDREFINE_PLATFORM_WORKERS": "-1"})


def test_file_set_upload_url_refusal_and_cancel(server: ServerProcess, tmp_path: Path):
    folder = phantom_folder(tmp_path / "set", n=8, size=64, seed=11)
    parts = [("files", (name, data, "image/png")) for name, data in folder_members(folder).items()]
    with _client(server, ADMIN_KEY) as admin:
        # a multipart set of files (names with their folders) is a dataset like a ZIP of them
        created = admin.post("/datasets", files=parts, data={"name": "file set"})
        assert created.status_code == 201 and created.json()["status"] == "ready", created.text
        assert created.json()["stats"]["pairs"] == 8
        dataset_id = created.json()["id"]
        # a URL from a host not on the allow-list (none is listed) is refused naming the field
        refused = admin.post("/datasets", json={"url": "http://127.0.0.1:9/data.zip", "name": "remote"})
        assert refused.status_code == 400 and refused.json()["field"] == "url"

        # cancel: the job ends cancelled (at once when queued, at its next epoch when running); twice is a 409
        job = admin.post("/jobs", json={"kind": "train", "dataset": dataset_id, "recipe": "cancelled-model",
                                        "hyperparameters": {"preset": "tiny", "epochs": 50}})
        assert job.status_code == 202
        job_id = job.json()["id"]
        cancel = admin.delete(f"/jobs/{job_id}")
        assert cancel.status_code == 200 and cancel.json()["id"] == job_id
        deadline = time.monotonic() + 120.0
        while (status := admin.get(f"/jobs/{job_id}").json()["status"]) != "cancelled":
            assert status in ("queued", "running") and time.monotonic() < deadline, status
            time.sleep(0.5)
        again = admin.delete(f"/jobs/{job_id}")
        assert again.status_code == 409 and again.json()["field"] == "job"
        assert admin.get("/models/cancelled-model/versions").status_code == 404  # nothing registered
        assert admin.delete(f"/datasets/{dataset_id}").status_code == 200


@pytest.mark.parametrize(("api_key", "admin_key", "expected"), [
    # (key sent, read GET /datasets, change POST /datasets) -> status; 503: let in (the platform is not open)
    (None, ADMIN_KEY, {(None, "read"): 503, (None, "change"): 401, (ADMIN_KEY, "change"): 503}),
    (TEST_API_KEY, None, {(None, "read"): 401, (TEST_API_KEY, "read"): 503, (TEST_API_KEY, "change"): 503,
                          (None, "change"): 401}),
    (TEST_API_KEY, ADMIN_KEY, {(TEST_API_KEY, "read"): 503, (ADMIN_KEY, "read"): 503, (TEST_API_KEY, "change"): 401,
                               (ADMIN_KEY, "change"): 503, ("wrong-key-123", "read"): 401}),
])
def test_which_key_each_call_needs(api_key, admin_key, expected):
    from starlette.testclient import TestClient

    from service.platform_api import PlatformState, create_platform_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(api_key=api_key, admin_key=admin_key)
    app = create_platform_app(PlatformState(unavailable="not opened in this test"), settings=lambda: settings)
    with TestClient(app) as client:
        for (key, call), status in expected.items():
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}) if key else ({},):
                response = client.get("/datasets", headers=headers) if call == "read" else \
                    client.post("/datasets", headers=headers, json={"url": "http://example.org/x.zip"})
                assert response.status_code == status, (key, call, headers, response.text)
                assert response.json()["error"] if status == 401 else response.headers["retry-after"] == "5"
