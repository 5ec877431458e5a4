"""S3 helpers for the platform tests; the moto server itself is ``tests/conftest.py``'s ``moto_endpoint``
fixture (127.0.0.1, module scope) and ``s3_env`` its settings."""

from __future__ import annotations

import hashlib

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PART = 5 * 1024 * 1024  # S3's smallest multipart part


def fresh_s3_store(request, endpoint: str):
    """An ``S3BlobStore`` on a new bucket named after the test (5 MiB multipart threshold)."""
    from medplatform.s3 import S3BlobStore

    bucket = f"medrefine-test-{hashlib.sha256(request.node.name.encode()).hexdigest()[:12]}"
    store = S3BlobStore(bucket, endpoint_url=endpoint, region_name="us-east-1", multipart_threshold=PART,
                        multipart_chunksize=PART)
    store.client.create_bucket(Bucket=bucket)
    return store
