"""medplatform blob stores: one contract run against ``LocalBlobStore`` and against ``S3BlobStore`` talking to
moto's standalone S3 server on 127.0.0.1 (the real boto3 client over real HTTP)."""

from __future__ import annotations

import hashlib
import os

import pytest

from medplatform.blobs import BlobStore, LocalBlobStore, blob_store_from_env
from medplatform.errors import InvalidValue, NotFound
from tests.support.platform_s3 import fresh_s3_store


@pytest.fixture
def s3_store(request, s3_env):
    return fresh_s3_store(request, s3_env["MEDREFINE_S3_ENDPOINT_URL"])


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_env) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    return fresh_s3_store(request, s3_env["MEDREFINE_S3_ENDPOINT_URL"])


def test_round_trip_list_size_delete(store, tmp_path):
    assert isinstance(store, BlobStore)
    store.put_bytes("datasets/abc/archive.zip", b"zip bytes")
    store.put_bytes("datasets/abc/meta.json", b"{}")
    store.put_bytes("models/default/v1/manifest.json", b'{"format": 1}')
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 100)
    store.put_file("models/default/v1/weights.bin", source)

    assert store.get_bytes("datasets/abc/archive.zip") == b"zip bytes"
    with store.open("models/default/v1/manifest.json") as handle:
        assert handle.read() == b'{"format": 1}'
    copy = store.get_file("models/default/v1/weights.bin", tmp_path / "out" / "w.bin")
    assert copy.read_bytes() == source.read_bytes()
    assert store.size("models/default/v1/weights.bin") == 25600
    assert store.exists("datasets/abc/meta.json") and not store.exists("datasets/abc/nope")
    assert store.list("datasets/") == ["datasets/abc/archive.zip", "datasets/abc/meta.json"]
    assert store.list("models/default/v1/") == ["models/default/v1/manifest.json", "models/default/v1/weights.bin"]
    assert len(store.list()) == 4

    store.put_bytes("datasets/abc/meta.json", b'{"v": 2}')  # overwrite replaces the whole object
    assert store.get_bytes("datasets/abc/meta.json") == b'{"v": 2}'
    store.delete("datasets/abc/meta.json")
    store.delete("datasets/abc/meta.json")  # deleting an absent key is not an error
    assert store.list("datasets/") == ["datasets/abc/archive.zip"]


def test_missing_keys_are_not_found_naming_the_key(store, tmp_path):
    for call in (lambda: store.get_bytes("a/missing"), lambda: store.open("a/missing"),
                 lambda: store.size("a/missing"), lambda: store.get_file("a/missing", tmp_path / "x")):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.field == "key" and info.value.value == "a/missing"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "/abs/path", "a\\b", "a//b", "./a", "", "a/./b",
                                 "sp ace", "x" * 513])
def test_hostile_keys_are_refused(store, key):
    with pytest.raises(InvalidValue) as info:
        store.put_bytes(key, b"x")
    assert info.value.field == "key"
    assert store.list() == []


def test_local_store_stays_inside_its_root(tmp_path):
    store = LocalBlobStore(tmp_path / "root")
    with pytest.raises(InvalidValue):
        store.put_bytes("../outside", b"x")
    assert not (tmp_path / "outside").exists()
    store.put_bytes("a/b/c", b"x")
    store.delete("a/b/c")
    assert list((tmp_path / "root").iterdir()) == []  # emptied directories are removed too


def test_s3_large_file_uses_multipart_upload(s3_store, tmp_path):
    store = s3_store
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024 + 17))  # three 5 MiB parts, the last one short
    store.put_file("runs/r1/big.bin", big)
    etag = store.client.head_object(Bucket=store.bucket, Key="runs/r1/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag  # S3's ETag of a multipart object: "<md5 of md5s>-<parts>"
    back = store.get_file("runs/r1/big.bin", tmp_path / "back.bin")
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert store.size("runs/r1/big.bin") == 11 * 1024 * 1024 + 17


def test_store_from_env_picks_the_backend(tmp_path, s3_env):
    local = blob_store_from_env({"MEDREFINE_DATA_DIR": str(tmp_path / "data")})
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "data" / "blobs"

    s3 = blob_store_from_env(s3_env)
    assert type(s3).__name__ == "S3BlobStore" and s3.bucket == s3_env["MEDREFINE_S3_BUCKET"]
    s3.client.create_bucket(Bucket=s3.bucket)
    s3.put_bytes("env/check", b"ok")
    assert s3.get_bytes("env/check") == b"ok"
    assert isinstance(blob_store_from_env({"MEDREFINE_S3_BUCKET": "", "MEDREFINE_DATA_DIR": str(tmp_path)}),
                      LocalBlobStore)  # an empty bucket variable means "not configured"
