"""Fetch a dataset archive from a URL for the server: allow-listed hosts only, no private addresses unless
listed, the connection pinned to the address that was checked, every redirect re-checked, bytes capped."""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from medplatform.errors import InvalidValue

ALLOW_ENV = "MEDREFINE_DATASET_URL_ALLOW"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
TIMEOUT_S = 30.0  # per connect / read
DEADLINE_S = 900.0  # the whole download, so a server dripping bytes cannot hold a request forever
_CHUNK = 1 << 16
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchRefused(InvalidValue):
    """A URL the server will not fetch, or a download it stopped; ``field`` is ``url``, ``value`` the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__("url", url, reason)
        self.reason = reason


def allow_list_from_env(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``MEDREFINE_DATASET_URL_ALLOW``: comma-separated host names, IP addresses or CIDR networks (empty:
    every URL is refused)."""
    env = os.environ if env is None else env
    return tuple(entry.strip() for entry in (env.get(ALLOW_ENV) or "").split(",") if entry.strip())


class AllowList:
    """Which hosts and addresses may be fetched from.

    A URL's host must be listed: a host name exactly (case-insensitive), an IP literal as itself or inside
    a listed network. Every address the host resolves to must be public (``is_global``, not multicast)
    unless that address is itself listed (``127.0.0.1``, ``10.0.0.0/8``): listing a *name* never admits
    a loopback, private, link-local or reserved address, so a name that resolves (or is rebound) to one is
    refused.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            text = entry.strip().lower().rstrip(".")
            if not text:
                continue
            try:
                self.networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            except ValueError:
                self.names.add(text)

    def host_listed(self, host: str) -> bool:
        literal = _ip_literal(host)
        if literal is not None:
            return self.address_listed(literal)
        return host.lower().rstrip(".") in self.names

    def address_listed(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def address_allowed(self, address: Address) -> bool:
        return self.address_listed(address) or (address.is_global and not address.is_multicast)


def _ip_literal(host: str) -> Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return _unmapped(address)


def _unmapped(address: Address) -> Address:
    # ::ffff:127.0.0.1 is loopback in disguise: judge the IPv4 address it carries
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_url(url: str, allow: AllowList) -> tuple[str, str, int, str, Address]:
    """``(scheme, host, port, path?query, address)`` of an allowed URL; ``FetchRefused`` naming why not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchRefused(url, f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(url, f"only http and https URLs are fetched, not {scheme or 'a relative URL'!r}")
    host = parts.hostname or ""
    if not host:
        raise FetchRefused(url, "the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused(url, "credentials in the URL are not accepted")
    if not allow.host_listed(host):
        raise FetchRefused(url, f"host {host!r} is not on the allow-list ({ALLOW_ENV})")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise FetchRefused(url, f"host {host!r} does not resolve ({exc})") from None
    addresses = [_unmapped(ipaddress.ip_address(info[4][0].split("%")[0])) for info in infos]
    refused = [str(a) for a in addresses if not allow.address_allowed(a)]
    if refused or not addresses:
        raise FetchRefused(url, f"host {host!r} resolves to a loopback, private, link-local or reserved address "
                                f"({', '.join(refused) or 'none'}) that is not on the allow-list")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, path, addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address, whatever the name resolves to by now (DNS rebinding)."""

    def __init__(self, host: str, port: int, address: Address, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address; the certificate is verified against the URL's host name (SNI)."""

    def __init__(self, host: str, port: int, address: Address, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = str(address)

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, allow_hosts: Iterable[str] | AllowList, max_bytes: int, *,
              dest_dir: str | os.PathLike[str] | None = None, timeout_s: float = TIMEOUT_S,
              deadline_s: float = DEADLINE_S, max_redirects: int = MAX_REDIRECTS) -> Path:
    """Download ``url`` into a new file in ``dest_dir`` (default: the system temp directory); returns it.

    Each hop (the URL and up to ``max_redirects`` redirects) is checked by :func:`check_url` and fetched
    over a connection to the address that was checked. A declared ``Content-Length`` over ``max_bytes`` is
    refused before reading; otherwise bytes are counted while streaming and the download is cut off, and
    its file removed, at ``max_bytes + 1``.

    Raises:
        FetchRefused: scheme, host, address, credentials, a non-200 answer, too many redirects, a body over
            ``max_bytes``, the deadline, or a network error (field ``url``).
    """
    allow = allow_hosts if isinstance(allow_hosts, AllowList) else AllowList(allow_hosts)
    started = time.monotonic()
    for _ in range(max_redirects + 1):
        scheme, host, port, path, address = check_url(url, allow)
        connection_type = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        connection = connection_type(host, port, address, timeout_s)
        try:
            connection.request("GET", path, headers={"User-Agent": "medrefine-dataset-fetch",
                                                     "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchRefused(url, f"HTTP {response.status} redirect without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchRefused(url, f"the server answered HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                raise FetchRefused(url, f"Content-Length {int(declared)} is over the limit of {max_bytes} bytes")
            return _stream(response, url, max_bytes, dest_dir, started + deadline_s)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchRefused(url, f"download failed ({type(exc).__name__}: {exc})") from None
        finally:
            connection.close()
    raise FetchRefused(url, f"more than {max_redirects} redirects")


def _stream(response: http.client.HTTPResponse, url: str, max_bytes: int,
            dest_dir: str | os.PathLike[str] | None, deadline: float) -> Path:
    fd, name = tempfile.mkstemp(prefix="fetch-", suffix=".part", dir=dest_dir)
    path = Path(name)
    try:
        received = 0
        with os.fdopen(fd, "wb") as handle:
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise FetchRefused(url, f"body over the limit of {max_bytes} bytes (cut off while streaming)")
                if time.monotonic() > deadline:
                    raise FetchRefused(url, "download took longer than the deadline")
                handle.write(chunk)
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise
