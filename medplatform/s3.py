"""``S3BlobStore``: the ``BlobStore`` protocol over any S3-compatible store with boto3 (AWS, MinIO, Ceph, moto).

Large files go through boto3's managed transfer (multipart upload, ranged parallel download).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from medplatform.blobs import validate_key, validate_prefix
from medplatform.errors import InvalidValue, NotFound

MULTIPART_THRESHOLD = 16 * 1024 * 1024  # bytes; files larger than this are uploaded in parts
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024  # S3 requires parts of at least 5 MiB (but the last)
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    """Keys ``a/b/c`` are object keys in ``bucket``; credentials come from boto3's usual chain (AWS_* env vars,
    profiles, instance roles) unless a ``client`` is injected."""

    def __init__(self, bucket: str, *, client: Any | None = None, endpoint_url: str | None = None,
                 region_name: str | None = None, multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunksize: int = MULTIPART_CHUNKSIZE) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        if not bucket:
            raise InvalidValue("MEDREFINE_S3_BUCKET", bucket, "an S3 blob store needs a bucket name")
        if multipart_chunksize < 5 * 1024 * 1024:
            raise InvalidValue("multipart_chunksize", multipart_chunksize, "S3 parts are at least 5 MiB")
        self.bucket = bucket
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region_name or None)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize)

    def _missing(self, exc: Exception, key: str) -> NotFound | None:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _MISSING_CODES:
            return NotFound("key", key, f"no object in bucket {self.bucket!r}")
        return None

    def _head(self, key: str) -> dict[str, Any]:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=validate_key(key))
        except Exception as exc:
            raise (self._missing(exc, key) or exc) from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=validate_key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        self.client.upload_file(str(path), self.bucket, validate_key(key), Config=self.transfer)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=validate_key(key))["Body"]
        except Exception as exc:
            raise (self._missing(exc, key) or exc) from exc

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        self._head(key)  # NotFound before any file is created
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, key, tmp, Config=self.transfer)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])


def s3_store_from_env(env: Mapping[str, str] | None = None) -> S3BlobStore:
    """MEDREFINE_S3_BUCKET, MEDREFINE_S3_ENDPOINT_URL (empty: AWS), region from AWS_REGION/AWS_DEFAULT_REGION;
    the access keys are read by boto3 itself from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN."""
    env = os.environ if env is None else env
    return S3BlobStore(env.get("MEDREFINE_S3_BUCKET", ""), endpoint_url=env.get("MEDREFINE_S3_ENDPOINT_URL"),
                       region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
