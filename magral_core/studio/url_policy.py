"""Which hosts the backend may fetch task images from: requests it makes on behalf of whoever can create tasks
(server-side request forgery is the risk), decided on the addresses a host name resolves to.

The rule, for each request (every redirect hop is a new request):

- the scheme is http or https; nothing else is ever fetched (`file:`, `gopher:`, ...);
- Label Studio itself (its origin, or its port on an address its host resolves to) is always allowed;
- a host named in `MAGRAL_ALLOWED_IMAGE_HOSTS` (`host` or `host:port`), or whose every address lies in a
  network named there (`10.0.0.0/8`, `fd00::/8`, `192.168.1.5`), is allowed whatever its addresses are;
- otherwise every address the host resolves to must be global (public): loopback, link-local (cloud
  metadata at 169.254.169.254), private, shared, unspecified, multicast and reserved addresses are refused.
  A public host is allowed when `*` is in the setting, or when the request follows a redirect of Label
  Studio (its presigned cloud-storage URLs); by default no other host is.

The check runs twice per request: before it (so a refusal names the URL) and when the connection is opened,
on the addresses the socket then connects to (`guarded_session`), so a name that resolves to a public address
first and to 127.0.0.1 a moment later (DNS rebinding) is refused too. Environment proxies are not used: a
proxy would resolve the name itself, out of reach of this check.

Pure except `resolve` (DNS) and `guarded_session` (sockets). Kept as one module because the check before a
request and the check at its connection must be the same rule.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from magral_core.errors import UserError

SETTING = "MAGRAL_ALLOWED_IMAGE_HOSTS"
DEFAULT_PORTS = {"http": 80, "https": 443}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], tuple[Address, ...]]
"""`resolve(host, port)` → the addresses a connection to `host` may use; raises OSError when it has none."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class HostNotAllowed(UserError):
    """A URL the policy refuses; the message names the host, the address that decided and the setting."""


@dataclass(frozen=True)
class Target:
    """Where one request goes: scheme, lower-case host (no brackets, no trailing dot) and port."""

    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class HostPolicy:
    """Parsed `MAGRAL_ALLOWED_IMAGE_HOSTS`: `any_public` ("*"), named `hosts` ("host" or "host:port",
    lower case) and `networks` ((network, port or None)). The empty policy allows Label Studio only."""

    any_public: bool = False
    hosts: frozenset[str] = frozenset()
    networks: tuple[tuple[Network, int | None], ...] = ()

    def names(self, target: Target) -> bool:
        """Whether the setting names this host (with any port, or with this port)."""
        return target.host in self.hosts or target.netloc in self.hosts

    def covers(self, address: Address, port: int) -> bool:
        """Whether a network of the setting holds `address` (for this port)."""
        return any(address in net and p in (None, port) for net, p in self.networks)

    def describe(self) -> str:
        parts = (["*"] if self.any_public else []) + sorted(self.hosts)
        parts += [str(net) + (f":{p}" if p else "") for net, p in self.networks]
        return ",".join(parts) or "none (Label Studio only)"


def parse_allowed_hosts(value: str) -> HostPolicy:
    """`MAGRAL_ALLOWED_IMAGE_HOSTS` → HostPolicy. Comma-separated entries: `*` (any public host), `none` or
    empty (nothing beyond Label Studio), `host`, `host:port`, an address (`10.1.2.3`, `[fd00::1]:9000`) or a
    network (`10.0.0.0/8`). Raises UserError naming an entry that is none of these."""
    any_public = False
    hosts: set[str] = set()
    networks: list[tuple[Network, int | None]] = []
    for raw in value.split(","):
        entry = raw.strip().lower()
        if entry in ("", "none"):
            continue
        if entry == "*":
            any_public = True
            continue
        try:
            if "/" in entry:
                networks.append((ipaddress.ip_network(entry, strict=False), None))
                continue
            parts = urlsplit(f"http://{entry}")
            host, port = _clean_host(parts.hostname or ""), parts.port
            if not host or parts.path or parts.query or parts.username is not None:
                raise ValueError(entry)
        except ValueError:
            raise UserError(
                f"{SETTING}: expected '*', 'none', host, host:port, an address or a network (10.0.0.0/8), "
                f"found {raw.strip()!r}"
            ) from None
        address = _literal(host)
        if address is not None:
            networks.append((ipaddress.ip_network(address), port))
        else:
            hosts.add(host if port is None else Target("http", host, port).netloc)
    return HostPolicy(any_public=any_public, hosts=frozenset(hosts), networks=tuple(networks))


def _clean_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _literal(host: str) -> Address | None:
    """The address a host written in canonical dotted/colon form is, else None (names and odd forms such as
    127.1 or 0x7f000001 are left to the resolver, which reads them as the socket would)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def target_of(url: str) -> Target:
    """The scheme, host and port a URL requests. Raises HostNotAllowed for a scheme other than http(s), no
    host, user info (`user@host`) or characters a browser and a server might read differently."""
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HostNotAllowed(f"expected an http(s) URL, found {url[:120]!r} that does not parse") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise HostNotAllowed(
            f"expected an http(s) URL, found scheme {scheme or 'none'!r} in {url[:120]!r}: only http and "
            f"https are ever fetched"
        )
    if any(c in parts.netloc for c in "@\\ \t\r\n%") or not parts.netloc.isprintable():
        raise HostNotAllowed(f"expected a plain host[:port] in {url[:120]!r}, found {parts.netloc[:80]!r}")
    host = _clean_host(parts.hostname or "")
    if not host:
        raise HostNotAllowed(f"expected a host in {url[:120]!r}, found none")
    return Target(scheme, host, port or DEFAULT_PORTS[scheme])


def resolve(host: str, port: int) -> tuple[Address, ...]:
    """The addresses `socket.getaddrinfo` gives for a TCP connection (as the socket layer reads the name:
    127.1, 0x7f000001 and 2130706433 are all 127.0.0.1). Raises OSError when there are none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise OSError(f"cannot encode host {host!r}") from exc
    addresses: list[Address] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"no address for {host!r}")
    return tuple(addresses)


def embedded_ipv4(address: Address) -> Address:
    """The IPv4 address an IPv6 address stands for (::ffff:a.b.c.d, 64:ff9b::a.b.c.d), else the address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_kind(address: Address) -> str:
    """Why an address is not public: "loopback", "link-local", "private", ... or "global"."""
    address = embedded_ipv4(address)
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "global" if address.is_global else "non-global"


@dataclass(frozen=True)
class Studio:
    """Label Studio as the policy knows it: its target and the addresses its host resolves to."""

    target: Target
    addresses: tuple[Address, ...]

    def is_studio(self, target: Target, addresses: Sequence[Address]) -> bool:
        if (target.host, target.port) == (self.target.host, self.target.port):
            return True
        return target.port == self.target.port and bool(addresses) and set(addresses) <= set(self.addresses)


def check(target: Target, addresses: Sequence[Address], policy: HostPolicy, studio: Studio, *,
          public_ok: bool) -> None:
    """Allow or refuse one request to `target` whose host resolved to `addresses` (see the module's rule).
    `public_ok`: the request follows a redirect of Label Studio. Raises HostNotAllowed."""
    if studio.is_studio(target, addresses) or policy.names(target):
        return
    for address in addresses:
        if policy.covers(embedded_ipv4(address), target.port) or policy.covers(address, target.port):
            continue
        kind = address_kind(address)
        if kind != "global":
            raise HostNotAllowed(
                f"host {target.host} resolves to {address}, a {kind} address: refused (server-side request "
                f"forgery protection); to allow it, add {target.netloc!r} or its network to {SETTING} "
                f"(now {policy.describe()})"
            )
        if not (public_ok or policy.any_public):
            raise HostNotAllowed(
                f"host {target.host} is not Label Studio's: refused; to allow it, add {target.netloc!r} to "
                f"{SETTING}, or '*' for any public host (now {policy.describe()})"
            )


# --- the connection-time check ----------------------------------------------------------------------------
Guard = Callable[[Target], tuple[Address, ...]]
"""Resolves a target, checks it, returns the addresses to connect to; raises HostNotAllowed."""

_GUARD: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("magral_image_guard", default=None)


@contextmanager
def guarding(guard: Guard) -> Iterator[None]:
    """Connections that `guarded_session` opens in this block (this thread) are checked by `guard`."""
    token = _GUARD.set(guard)
    try:
        yield
    finally:
        _GUARD.reset(token)


def _connect(conn: HTTPConnection, scheme: str) -> socket.socket:
    guard = _GUARD.get()
    if guard is None:  # fail closed: a connection outside `guarding` is a bug, not a fetch
        raise HostNotAllowed(f"connection to {conn.host} outside an image download: refused")
    addresses = guard(Target(scheme, _clean_host(conn.host), int(conn.port or DEFAULT_PORTS[scheme])))
    last: Exception | None = None
    for address in addresses:  # connect to the addresses that were checked, not to a new lookup
        try:
            return urllib3_connection.create_connection(
                (str(address), conn.port),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from exc
        except OSError as exc:
            last = exc
    raise NewConnectionError(conn, f"failed to connect to {conn.host}: {last}")


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _connect(self, "http")


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _connect(self, "https")


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


def guarded_session() -> requests.Session:
    """A requests session whose every new connection is checked by the guard of `guarding` (and refused
    outside it); environment proxies are ignored."""
    session = requests.Session()
    session.trust_env = False
    adapter = _GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
