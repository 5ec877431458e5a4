"""moto's standalone S3 server on 127.0.0.1 for the platform tests (module scope; stopped at the end)."""

from __future__ import annotations

import hashlib
import socket

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PART = 5 * 1024 * 1024  # S3's smallest multipart part


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """``http://127.0.0.1:<port>`` of a ThreadedMotoServer (the real HTTP protocol boto3 speaks to AWS)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch) -> dict[str, str]:
    """Test credentials in the environment (boto3 reads them there) and the MEDREFINE_S3_* settings."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return {**S3_ENV, "MEDREFINE_S3_BUCKET": "medrefine-test", "MEDREFINE_S3_ENDPOINT_URL": moto_endpoint}


def fresh_s3_store(request, endpoint: str):
    """An ``S3BlobStore`` on a new bucket named after the test (5 MiB multipart threshold)."""
    from medplatform.s3 import S3BlobStore

    bucket = f"medrefine-test-{hashlib.sha256(request.node.name.encode()).hexdigest()[:12]}"
    store = S3BlobStore(bucket, endpoint_url=endpoint, region_name="us-east-1", multipart_threshold=PART,
                        multipart_chunksize=PART)
    store.client.create_bucket(Bucket=bucket)
    return store
