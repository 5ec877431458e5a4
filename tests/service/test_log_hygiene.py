"""What reaches the server log and what the key-less pages tell a stranger (issue 15, items 7, 8, 9, 12).

Against a real ``python -m service`` on loopback (its own server: a Python warning is shown once per
process, so a shared server could already have swallowed the one under test):

* a DICOM SEG request with ``anonymize=false`` does not write the PatientName to the log (highdicom warns
  about a single-component person name, quoting it);
* a request path with ``%0A`` cannot forge a log line, and an upload's 300-character file name is not
  logged (it used to end up in an ERROR traceback);
* a second server started with the same ``BENTOML_HOME`` leaves the first one's ``/metrics`` counters
  intact, and each instance's private Prometheus directory is removed when it exits;
* ``/`` serves no page that loads anything from another host; ``/schema.json`` needs the key;
  ``/v2/models/<unknown>/ready`` does not list the served models; gRPC UNIMPLEMENTED names no Python class.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading
import time
import warnings

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.bad_inputs import dicom_bytes, pil_bytes
from tests.support.service_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.timeout(300)

SINGLE_NAME = "Quixotewald"  # no '^': highdicom warns "The string "Quixotewald" is unlikely to ..."
LONG_NAME = "Zebulonfile" * 27 + ".png"  # 301 characters
EXTERNAL_URL = re.compile(r"""(?:https?:)?//(?!(?:127\.0\.0\.1|localhost|\[::1\])[:/"'])[A-Za-z0-9.-]+\.[A-Za-z]""")


@pytest.fixture(scope="module")
def server(service_artifacts, tmp_path_factory) -> ServerProcess:
    """A fresh server (API key on) for this module only."""
    started = start_server(service_artifacts.art_dir, tmp_path_factory.mktemp("log_hygiene"))
    yield started
    started.stop()


def _new_log(server: ServerProcess, before: int, settle_s: float = 1.0) -> str:
    time.sleep(settle_s)  # the access log line is written just after the answer leaves
    return server.log()[before:]


def _png() -> bytes:
    return pil_bytes((np.indices((32, 32)).sum(axis=0) * 4 % 256).astype(np.uint8), "PNG")


# ----------------------------------------------------------------------------------------------------------
# The sanitiser itself (in this process)
# ----------------------------------------------------------------------------------------------------------


def test_records_are_escaped_and_tracebacks_keep_no_message():
    from service.log_privacy import escape_controls, sanitise_record

    assert escape_controls("a\nb\r\x1b[31m\x85\u2028") == "a\\x0ab\\x0d\\x1b[31m\\x85\\u2028"
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "path=%s", ("/x\n2099-01-01 [INFO] FORGED",), None)
    assert sanitise_record(record).getMessage() == "path=/x\\x0a2099-01-01 [INFO] FORGED"
    try:
        try:
            raise OSError(36, "File name too long", "/tmp/" + LONG_NAME)
        except OSError as exc:
            raise RuntimeError(f"could not read {SINGLE_NAME}") from exc
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = logging.Formatter().format(sanitise_record(record))
    assert "Traceback (most recent call last):" in text and "direct cause" in text
    assert "RuntimeError: [message withheld" in text and "OSError: [errno 36, message withheld" in text
    assert SINGLE_NAME not in text and "Zebulonfile" not in text


def test_warnings_are_logged_without_their_text(caplog, monkeypatch):
    from service.log_privacy import install_log_redaction

    for module, hook in ((sys, "excepthook"), (threading, "excepthook")):  # restored after the test
        monkeypatch.setattr(module, hook, getattr(module, hook))
    factory = logging.getLogRecordFactory()
    try:
        with caplog.at_level(logging.WARNING), warnings.catch_warnings():
            warnings.simplefilter("always")
            install_log_redaction()
            warnings.warn(f'The string "{SINGLE_NAME}" is unlikely to represent a person name', UserWarning,
                          stacklevel=1)
    finally:
        logging.setLogRecordFactory(factory)
    assert "UserWarning at" in caplog.text and "test_log_hygiene.py" in caplog.text
    assert SINGLE_NAME not in caplog.text


# ----------------------------------------------------------------------------------------------------------
# The live server's log
# ----------------------------------------------------------------------------------------------------------


def test_patient_name_in_a_third_party_warning_is_not_logged(server):
    pixels = (np.random.default_rng(5).random((48, 40)) * 255).astype(np.uint8)
    data = dicom_bytes(pixels=pixels, patient_name=SINGLE_NAME, patient_id="PID-0000")
    before = len(server.log())
    with server.client() as client:
        kept = client.post("/segment", files={"file": ("scan.dcm", data, "application/dicom")},
                           data={"dicom_seg": "true", "anonymize": "false"})
    assert kept.status_code == 200, kept.text
    log = _new_log(server, before)
    assert "UserWarning" in log  # highdicom did warn: the test saw what it is about
    assert SINGLE_NAME not in log


def test_a_request_path_cannot_forge_a_log_line(server):
    before = len(server.log())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /x%0A2099-01-01T00:00:00+0000%20[INFO]%20FORGED%0D%0A HTTP/1.1\r\n"
                     b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    log = _new_log(server, before)
    assert "FORGED" in log  # the request was logged ...
    assert not any(line.startswith("2099-01-01") for line in log.splitlines())  # ... on its own line only
    assert "\\x0a2099-01-01" in log


def test_an_upload_file_name_is_never_logged(server):
    before = len(server.log())
    with server.client() as client:
        answer = client.post("/segment", files={"file": (LONG_NAME, _png(), "image/png")})
    assert answer.status_code in (200, 400), answer.text
    log = _new_log(server, before)
    assert "/segment" in log
    assert "Zebulonfile" not in log
    assert "Traceback" not in log  # a client's bad file name is not a server fault


# ----------------------------------------------------------------------------------------------------------
# Metrics survive a neighbour
# ----------------------------------------------------------------------------------------------------------


def _counter(server: ServerProcess, endpoint: str, protocol: str, status: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    wanted = {f'endpoint="{endpoint}"', f'protocol="{protocol}"', f'status="{status}"'}
    for line in text.splitlines():
        if line.startswith("medrefine_requests_total{") and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_second_server_on_the_same_bentoml_home_leaves_the_metrics_alone(server, service_artifacts, tmp_path):
    with server.client() as client:
        for _ in range(3):
            assert client.get("/v2/models/segment").status_code == 200
    counted = _counter(server, "/v2/models/{model}", "oip-http", "200")
    assert counted >= 3, httpx.get(server.url + "/metrics", timeout=30).text[-3000:]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    neighbour = start_server(service_artifacts.art_dir, tmp_path / "neighbour", api_key=None,
                             env={"BENTOML_HOME": server.env["BENTOML_HOME"], "TMPDIR": str(tmp)})
    try:
        after = _counter(server, "/v2/models/{model}", "oip-http", "200")
        assert after >= counted, f"counter went from {counted} to {after} when a neighbour started"
        private = sorted(tmp.glob("medrefine-prometheus-*"))
        assert len(private) == 1 and private[0].is_dir(), sorted(tmp.iterdir())
    finally:
        code = neighbour.stop()
    assert code == 0, neighbour.log()[-2000:]
    assert list(tmp.glob("medrefine-prometheus-*")) == [], "the private Prometheus directory was left behind"


# ----------------------------------------------------------------------------------------------------------
# What a stranger sees without the key
# ----------------------------------------------------------------------------------------------------------


def test_no_served_page_loads_anything_from_another_host(server):
    for path in ("/", "/docs", "/ui", "/ui/"):
        answer = httpx.get(server.url + path, timeout=30, follow_redirects=True)
        if answer.status_code == 404:
            continue
        assert answer.status_code == 200, (path, answer.status_code)
        found = EXTERNAL_URL.findall(answer.text)
        assert found == [], f"{path} refers to other hosts: {found[:5]}"
    assert httpx.get(server.url + "/static_content/swagger-initializer.js", timeout=30).status_code == 404


def test_schema_needs_the_key(server):
    refused = httpx.get(server.url + "/schema.json", timeout=30)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert "segment" not in refused.text
    accepted = httpx.get(server.url + "/schema.json", headers=server.headers(), timeout=30)
    assert accepted.status_code == 200 and accepted.json()["name"] == "medrefine"


def test_unknown_model_ready_does_not_list_the_served_models(server):
    for path in ("/v2/models/nope/ready", "/v2/models/nope/versions/1/ready", "/v2/models/segment/versions/zz/ready"):
        answer = httpx.get(server.url + path, timeout=30)
        assert answer.status_code == 404, (path, answer.text)
        assert "not served" in answer.json()["error"]
        assert "generate" not in answer.text and "serves" not in answer.text and "available" not in answer.text
    assert "segment" not in httpx.get(server.url + "/v2/models/nope/ready", timeout=30).text
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelReady(service_pb2.ModelReadyRequest(name="nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "segment" not in info.value.details()


def test_unimplemented_rpcs_name_no_python_class(server):
    before = len(server.log())
    headers = (("authorization", f"Bearer {server.api_key}"),)
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, request in (("RepositoryIndex", service_pb2.RepositoryIndexRequest()),
                              ("ModelStatistics", service_pb2.ModelStatisticsRequest()),
                              ("ModelConfig", service_pb2.ModelConfigRequest(name="segment"))):
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, name)(request, timeout=30, metadata=headers)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
            details = info.value.details()
            assert name in details and "class" not in details and "Error" not in details, details
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")(b"", timeout=30)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "class" not in info.value.details()
    assert "Traceback" not in _new_log(server, before)
