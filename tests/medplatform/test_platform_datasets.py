"""medplatform.datasets: a good phantom ZIP becomes ``ready`` with its counts; faults name their files; the
same content in another order is one dataset; hostile archives leave nothing behind; deleting is refused
while a queued job uses the dataset; thumbnails overlay the masks; DICOM members are de-identified on request."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from sqlalchemy import select

from core.datasets import SegmentationDataset
from core.imageio import decode_image, encode_mask_png, encode_png
from medplatform import datasets, db
from medplatform.archive import ArchiveRefused
from medplatform.dataset_limits import DatasetLimits
from medplatform.errors import Conflict, InvalidValue, NotFound
from tests.support.platform_fixtures import folder_members, make_platform, phantom_folder, zip_bytes


@pytest.fixture
def platform(tmp_path, monkeypatch):
    return make_platform(tmp_path, monkeypatch)


@pytest.fixture
def members(tmp_path) -> dict[str, bytes]:
    """8 ultrasound phantoms of 48 px: images/NNNN.png + masks/NNNN.png."""
    return folder_members(phantom_folder(tmp_path / "src", n=8, size=48))


def _rows(platform) -> list[db.Dataset]:
    with platform.sessions() as session:
        return list(session.scalars(select(db.Dataset)))


def test_good_zip_is_ready_with_counts_and_a_normalised_archive(platform, members, tmp_path):
    data = zip_bytes({**members, "README.txt": b"notes"}, prefix="busi/")
    row = datasets.ingest_zip(platform, "phantoms", data, workdir=tmp_path / "work")
    assert row.status == "ready" and row.error is None and len(row.id) == 32
    stats = row.stats
    assert (stats["pairs"], stats["images"], stats["masks"], stats["files"]) == (8, 8, 8, 17)
    assert stats["formats"] == {"png": 8} and stats["min_hw"] == [48, 48] == stats["max_hw"]
    assert stats["bytes"] == sum(len(v) for v in members.values())
    assert row.blob_key == f"datasets/{row.id}.zip" and platform.blobs.exists(row.blob_key)
    assert stats["archive_bytes"] == platform.blobs.size(row.blob_key)
    # The stored ZIP holds images/ + masks/ only (no root folder, no README), readable by core's reader.
    stored = platform.blobs.get_bytes(row.blob_key)
    assert sorted(zipfile.ZipFile(io.BytesIO(stored)).namelist()) == sorted(members)
    reread = SegmentationDataset(stored)
    assert reread.names == [f"{i:04d}" for i in range(8)]
    assert np.array_equal(reread[0].mask, decode_image(members["masks/0000.png"]).pixels > 0.5)
    assert datasets.get_dataset(platform, row.id).sha256 == row.sha256
    assert [d.id for d in datasets.list_datasets(platform)] == [row.id]
    described = datasets.describe(row)
    assert described["id"] == row.id and described["stats"]["pairs"] == 8
    assert list((tmp_path / "work").iterdir()) == [], "the staging directory is removed"


def test_same_content_in_another_order_container_and_upload_form_is_one_dataset(platform, members, tmp_path):
    first = datasets.ingest_zip(platform, "a", zip_bytes(members), workdir=tmp_path / "work")
    path = tmp_path / "reordered.zip"
    path.write_bytes(zip_bytes(members, prefix="other_root/", compression=zipfile.ZIP_STORED, reverse=True))
    second = datasets.ingest_zip(platform, "b", path, workdir=tmp_path / "work")
    files = [(name, data) for name, data in reversed(members.items())]
    third = datasets.ingest_files(platform, "c", files, workdir=tmp_path / "work")
    assert first.id == second.id == third.id and first.name == "a"
    assert len(_rows(platform)) == 1
    assert platform.blobs.list("datasets/") == [first.blob_key]
    changed = dict(members, **{"masks/0003.png": encode_mask_png(np.zeros((48, 48), np.uint8))})
    other = datasets.ingest_zip(platform, "d", zip_bytes(changed), workdir=tmp_path / "work")
    assert other.id != first.id and other.sha256 != first.sha256


def test_busi_suffix_and_bare_file_names(platform, members, tmp_path):
    files = []
    for name, data in members.items():
        folder, _, filename = name.partition("/")
        stem = filename.removesuffix(".png")
        files.append((f"{stem}_mask.png" if folder == "masks" else filename, data))
    row = datasets.ingest_files(platform, "busi", files, workdir=tmp_path / "work")
    assert row.status == "ready" and row.stats["pairs"] == 8
    names = zipfile.ZipFile(io.BytesIO(platform.blobs.get_bytes(row.blob_key))).namelist()
    assert "masks/0000_mask.png" in names and "images/0000.png" in names


def test_faults_name_each_file_and_nothing_is_stored(platform, members, tmp_path):
    broken = dict(members)
    broken["masks/0001.png"] = encode_mask_png(np.ones((32, 32), np.uint8))  # size differs from its image
    broken["masks/0002.png"] = encode_png(np.full((48, 48), 3, np.uint8))  # values {3}: not binary-ish
    broken["images/0003.png"] = b"\x89PNG\r\n\x1a\n truncated"  # unreadable
    row = datasets.ingest_zip(platform, "broken", zip_bytes(broken), workdir=tmp_path / "work")
    assert row.status == "error" and row.blob_key is None
    files = row.error["files"]
    assert set(files) == {"masks/0001.png", "masks/0002.png", "images/0003.png"}
    assert "32x32" in files["masks/0001.png"] and "images/0001.png" in files["masks/0001.png"]
    assert files["masks/0002.png"].startswith("ambiguous mask values")
    assert platform.blobs.list("datasets/") == []
    again = datasets.ingest_zip(platform, "broken", zip_bytes(broken, reverse=True), workdir=tmp_path / "work")
    assert again.id == row.id  # an error dataset is content-hashed too

    unpaired = dict(members)
    del unpaired["masks/0004.png"]
    unpaired["masks/9999.png"] = members["masks/0005.png"]
    unpaired["images/notes.txt"] = b"hello"
    row = datasets.ingest_zip(platform, "unpaired", zip_bytes(unpaired), workdir=tmp_path / "work")
    assert row.status == "error"
    files = row.error["files"]
    assert set(files) == {"images/0004.png", "masks/9999.png", "images/notes.txt"}
    assert "no mask" in files["images/0004.png"] and "without an image" in files["masks/9999.png"]
    assert "unsupported" in files["images/notes.txt"]
    assert row.error["problems"], "core.datasets' own messages are kept"

    layout = datasets.ingest_zip(platform, "flat", zip_bytes({"a.png": members["images/0000.png"]}),
                                 workdir=tmp_path / "work")
    assert layout.status == "error" and "images/ and masks/" in layout.error["problems"][0]


def test_hostile_zip_writes_no_row_no_blob_and_nothing_outside(platform, members, tmp_path):
    work = tmp_path / "work"
    data = zip_bytes({**members, "../../escaped.png": members["images/0000.png"]})
    with pytest.raises(ArchiveRefused) as refused:
        datasets.ingest_zip(platform, "evil", data, workdir=work)
    assert refused.value.entry == "../../escaped.png"
    assert _rows(platform) == [] and platform.blobs.list("") == []
    assert list(work.iterdir()) == [] and not list(tmp_path.rglob("escaped.png"))
    with pytest.raises(ArchiveRefused) as refused:
        datasets.ingest_files(platform, "evil", [("../images/x.png", b"x")], workdir=work)
    assert refused.value.entry == "../images/x.png" and refused.value.field == "files"
    with pytest.raises(ArchiveRefused):
        datasets.ingest_files(platform, "evil", [("images/a.zip", zip_bytes(members))], workdir=work)
    with pytest.raises(ArchiveRefused):
        datasets.ingest_files(platform, "evil", [("images/a.png", zip_bytes(members))], workdir=work)
    assert _rows(platform) == [] and list(work.iterdir()) == []


def test_limits_on_upload_size_file_count_and_dataset_count(platform, members, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(ArchiveRefused):
        datasets.ingest_zip(platform, "x", zip_bytes(members), limits=DatasetLimits(max_files=10), workdir=work)
    with pytest.raises(ArchiveRefused):
        datasets.ingest_files(platform, "x", list(members.items()), limits=DatasetLimits(max_bytes=4000),
                              workdir=work)
    one = DatasetLimits(max_datasets=1)
    first = datasets.ingest_zip(platform, "first", zip_bytes(members), limits=one, workdir=work)
    assert datasets.ingest_zip(platform, "same", zip_bytes(members), limits=one, workdir=work).id == first.id
    other = folder_members(phantom_folder(tmp_path / "other", n=2, size=32, seed=5))
    with pytest.raises(Conflict) as full:
        datasets.ingest_zip(platform, "second", zip_bytes(other), limits=one, workdir=work)
    assert full.value.field == "datasets"
    assert platform.blobs.list("datasets/") == [first.blob_key], "the refused upload's blob is removed"
    with pytest.raises(InvalidValue) as bad_name:
        datasets.ingest_zip(platform, "  ", zip_bytes(members), workdir=work)
    assert bad_name.value.field == "name"


def test_delete_is_refused_while_a_queued_job_uses_it(platform, members, tmp_path):
    row = datasets.ingest_zip(platform, "train me", zip_bytes(members), workdir=tmp_path / "work")
    with platform.sessions.begin() as session:
        job = db.Job(kind="train", dataset_id=row.id, status="queued")
        session.add(job)
    with pytest.raises(Conflict) as refused:
        datasets.delete_dataset(platform, row.id)
    assert refused.value.field == "dataset" and job.id in str(refused.value)
    assert platform.blobs.exists(row.blob_key)
    for status in ("running", "succeeded"):
        with platform.sessions.begin() as session:
            session.get(db.Job, job.id).status = status
        if status == "running":
            with pytest.raises(Conflict):
                datasets.delete_dataset(platform, row.id)
    datasets.delete_dataset(platform, row.id)
    assert not platform.blobs.exists(row.blob_key) and _rows(platform) == []
    with platform.sessions() as session:
        assert session.get(db.Job, job.id).dataset_id is None  # the finished job's record outlives it
    with pytest.raises(NotFound):
        datasets.get_dataset(platform, row.id)
    with pytest.raises(NotFound):
        datasets.delete_dataset(platform, row.id)


def test_thumbnails_overlay_the_masks(platform, tmp_path):
    members = folder_members(phantom_folder(tmp_path / "src", n=3, size=64))
    row = datasets.ingest_zip(platform, "thumbs", zip_bytes(members), workdir=tmp_path / "work")
    thumbs = datasets.thumbnails(platform, row.id, n=5, size=32)
    assert [t.name for t in thumbs] == ["0000", "0001", "0002"]
    for thumb in thumbs:
        pixels = np.asarray(Image.open(io.BytesIO(thumb.png)))
        assert pixels.shape == (32, 32, 3)
        outline = np.all(pixels == (255, 60, 60), axis=-1)
        assert outline.any(), "the mask's outline is drawn in red"
        gray = pixels[..., 0] == pixels[..., 1]
        assert gray.mean() > 0.5, "away from the lesion the image stays gray"
    with pytest.raises(InvalidValue):
        datasets.thumbnails(platform, row.id, n=0)
    broken = datasets.ingest_zip(platform, "broken", zip_bytes({"images/a.png": members["images/0000.png"],
                                                                "masks/b.png": members["masks/0000.png"]}),
                                 workdir=tmp_path / "work")
    assert broken.status == "error" and datasets.thumbnails(platform, broken.id) == []


def _dicom_members() -> dict[str, bytes]:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.OtherPatientNames = "Roe^Richard"
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    mask = np.zeros((128, 128), np.uint8)
    mask[40:80, 50:90] = 1
    return {"images/ct.dcm": buffer.getvalue(), "masks/ct.png": encode_mask_png(mask)}


def test_dicom_members_are_deidentified_on_request(platform, tmp_path):
    members = _dicom_members()
    kept = datasets.ingest_zip(platform, "ct", zip_bytes(members), workdir=tmp_path / "work")
    clean = datasets.ingest_zip(platform, "ct", zip_bytes(members), deidentify=True, workdir=tmp_path / "work")
    assert kept.status == clean.status == "ready" and kept.id != clean.id
    assert clean.stats["deidentified_files"] == 1 and clean.stats["formats"] == {"dicom": 1}

    def stored(row) -> pydicom.Dataset:
        archive = zipfile.ZipFile(io.BytesIO(platform.blobs.get_bytes(row.blob_key)))
        return pydicom.dcmread(io.BytesIO(archive.read("images/ct.dcm")))

    original, anonymous = stored(kept), stored(clean)
    assert str(original.PatientName) == "CompressedSamples^CT1"
    assert str(anonymous.PatientName) == "" and anonymous.PatientID == "" and anonymous.PatientBirthDate == ""
    assert "OtherPatientNames" not in anonymous and anonymous.PatientIdentityRemoved == "YES"
    assert anonymous.StudyInstanceUID == original.StudyInstanceUID  # references kept
    assert np.array_equal(anonymous.pixel_array, original.pixel_array)
    raw = zipfile.ZipFile(io.BytesIO(platform.blobs.get_bytes(clean.blob_key))).read("images/ct.dcm")
    assert b"CompressedSamples" not in raw and b"Roe^Richard" not in raw


def test_deidentify_list_covers_the_seg_writers_list():
    from core.dicom_seg import PATIENT_IDENTIFIER_KEYWORDS as SEG_KEYWORDS
    from medplatform.deidentify import PATIENT_IDENTIFIER_KEYWORDS

    assert set(SEG_KEYWORDS) <= set(PATIENT_IDENTIFIER_KEYWORDS)


def test_the_same_upload_at_once_from_three_threads_is_one_dataset(platform, members, tmp_path):
    import threading

    data, results, errors = zip_bytes(members), [], []

    def upload(index: int) -> None:
        try:
            results.append(datasets.ingest_zip(platform, f"upload {index}", data, workdir=tmp_path / "work").id)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and len(results) == 3 and len(set(results)) == 1
    assert len(_rows(platform)) == 1
    assert platform.blobs.list("datasets/") == [f"datasets/{results[0]}.zip"], "the losers' blobs are removed"
