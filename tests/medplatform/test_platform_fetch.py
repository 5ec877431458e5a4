"""medplatform.fetch against a local HTTP server on 127.0.0.1 (started and stopped by the fixture): an
allow-listed URL downloads; loopback is refused unless its address is listed; an endless body is cut off
while streaming; a redirect to a host off the list is refused; the checked address is the one connected to."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading

import pytest

from medplatform import datasets, fetch
from medplatform.fetch import AllowList, FetchRefused, fetch_url
from tests.support.platform_fixtures import folder_members, make_platform, phantom_folder, zip_bytes

MiB = 1 << 20


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the server closes

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append((self.path, self.headers.get("Host")))
        port = server.server_address[1]
        if self.path == "/data.zip":
            self._send(200, server.payload)
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            chunk = b"\0" * (64 * 1024)
            try:
                for _ in range(16 * 1024):  # 1 GiB at most, so the handler ends even if nobody stops reading
                    self.wfile.write(chunk)
                    server.sent += len(chunk)
            except OSError:
                pass
        elif self.path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif self.path == "/hop":
            self._redirect(f"http://127.0.0.1:{port}/data.zip")
        elif self.path == "/away":
            self._redirect(f"http://localhost:{port}/data.zip")
        elif self.path == "/loop":
            self._redirect("/loop")
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.sent = [], 0
    members = folder_members(phantom_folder(tmp_path / "src", n=4, size=32))
    httpd.payload = zip_bytes(members)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=30)


def _url(server, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.server_address[1]}{path}"


def test_allow_listed_address_downloads(server, tmp_path):
    path = fetch_url(_url(server, "/data.zip"), ["127.0.0.1"], MiB, dest_dir=tmp_path)
    assert path.read_bytes() == server.payload and path.parent == tmp_path
    hop = fetch_url(_url(server, "/hop"), ["127.0.0.1"], MiB, dest_dir=tmp_path)  # a redirect on the list
    assert hop.read_bytes() == server.payload
    assert [r[0] for r in server.requests] == ["/data.zip", "/hop", "/data.zip"]


def test_loopback_is_refused_unless_its_address_is_listed(server, tmp_path):
    for allow, url, reason in [
        ([], _url(server, "/data.zip"), "not on the allow-list"),
        (["example.org"], _url(server, "/data.zip"), "not on the allow-list"),
        (["localhost"], _url(server, "/data.zip", host="localhost"), "loopback"),  # a listed *name* is not enough
        (["[::1]", "::ffff:127.0.0.1"], _url(server, "/data.zip"), "not on the allow-list"),
    ]:
        with pytest.raises(FetchRefused) as refused:
            fetch_url(url, allow, MiB, dest_dir=tmp_path)
        assert reason in refused.value.reason and refused.value.field == "url"
    assert server.requests == [], "nothing was sent to a refused address"
    assert list(tmp_path.glob("fetch-*")) == []


def test_endless_body_is_cut_off_while_streaming(server, tmp_path):
    with pytest.raises(FetchRefused) as refused:
        fetch_url(_url(server, "/endless"), ["127.0.0.1"], MiB, dest_dir=tmp_path)
    assert "cut off while streaming" in refused.value.reason
    with pytest.raises(FetchRefused) as declared:
        fetch_url(_url(server, "/declared-huge"), ["127.0.0.1"], MiB, dest_dir=tmp_path)
    assert "Content-Length" in declared.value.reason
    assert list(tmp_path.glob("fetch-*")) == [], "a partial download is removed"


def test_redirects_to_a_host_off_the_list_and_redirect_loops_are_refused(server, tmp_path):
    with pytest.raises(FetchRefused) as refused:
        fetch_url(_url(server, "/away"), ["127.0.0.1"], MiB, dest_dir=tmp_path)
    assert "'localhost' is not on the allow-list" in refused.value.reason
    assert [r[0] for r in server.requests] == ["/away"], "the redirect target was never requested"
    with pytest.raises(FetchRefused) as looping:
        fetch_url(_url(server, "/loop"), ["127.0.0.1"], MiB, dest_dir=tmp_path)
    assert "redirects" in looping.value.reason


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.zip", "http://user:pw@127.0.0.1/x",
                                 "http:///nohost", "//127.0.0.1/x.zip", "http://127.0.0.1:99999/x"])
def test_other_schemes_credentials_and_malformed_urls_are_refused(url):
    with pytest.raises(FetchRefused):
        fetch_url(url, ["127.0.0.1"], MiB)


def test_the_checked_address_is_the_one_connected_to(server, tmp_path, monkeypatch):
    """DNS rebinding: the name resolves to the listed 127.0.0.1 when checked and to an unroutable address
    afterwards; the download still reaches 127.0.0.1 because the name is resolved once and pinned."""
    real = socket.getaddrinfo
    lookups = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            lookups.append(host)
            address = "127.0.0.1" if len(lookups) == 1 else "203.0.113.9"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = server.server_address[1]
    path = fetch_url(f"http://rebind.test:{port}/data.zip", ["rebind.test", "127.0.0.1"], MiB, dest_dir=tmp_path)
    assert path.read_bytes() == server.payload
    assert lookups == ["rebind.test"]
    assert server.requests == [("/data.zip", f"rebind.test:{port}")], "the Host header keeps the name"


def test_allow_list_rules():
    allow = AllowList(["data.example.org", "10.1.0.0/16", "127.0.0.1"])
    assert allow.host_listed("DATA.example.org.") and not allow.host_listed("example.org")
    assert allow.host_listed("10.1.2.3") and not allow.host_listed("10.2.0.1")
    assert allow.address_allowed(ipaddress.ip_address("93.184.216.34"))  # public
    for private in ("10.2.0.1", "192.168.1.1", "169.254.169.254", "::1", "fe80::1", "100.64.0.1", "0.0.0.0"):
        assert not allow.address_allowed(ipaddress.ip_address(private)), private
    assert allow.address_allowed(ipaddress.ip_address("10.1.9.9"))
    assert fetch._ip_literal("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert fetch.allow_list_from_env({"MEDREFINE_DATASET_URL_ALLOW": " a.org, 10.0.0.0/8 ,,"}) == ("a.org",
                                                                                                    "10.0.0.0/8")


def test_ingest_url_end_to_end(server, tmp_path, monkeypatch):
    platform = make_platform(tmp_path, monkeypatch)
    row = datasets.ingest_url(platform, "from url", _url(server, "/data.zip"), allow_hosts=["127.0.0.1"],
                              workdir=tmp_path / "work")
    assert row.status == "ready" and row.stats["pairs"] == 4
    monkeypatch.setenv("MEDREFINE_DATASET_URL_ALLOW", "")
    with pytest.raises(FetchRefused):
        datasets.ingest_url(platform, "from url", _url(server, "/data.zip"), workdir=tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []

