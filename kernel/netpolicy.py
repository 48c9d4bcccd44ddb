"""Where downloads may connect: a destination policy checked on the resolved address.

Any API user names the URLs the server fetches, so without a policy the server fetches
whatever they point at: cloud metadata services, link-local devices, or (in a multi-tenant
deployment) private services. ``NetPolicy`` decides per destination, from ``network``:

- ``network.allow``: CIDRs and host names always allowed; they win over every rule below (so
  ``deny: ["0.0.0.0/0", "::/0"]`` plus an ``allow`` list is an allow-list);
- ``network.deny``: CIDRs and host names refused;
- by default link-local addresses and cloud metadata endpoints are refused
  (``DEFAULT_DENIED``, ``DENIED_NAMES``), as are multicast and reserved ranges;
- loopback and private ranges are allowed unless ``network.deny_private`` is set (do set it
  when the API's users are not the machine's operators).

A host name entry matches that name exactly, or its subdomains when it starts with a dot.
Addresses are normalised before the check: an IPv4-mapped or NAT64 IPv6 address is judged as
the IPv4 address inside it; decimal, octal and hex IPv4 spellings reach the check as the
dotted address the resolver returns.

The check runs where the connection is made, on every address the name resolves to, for
every connection (each redirect hop too): ``check_address(host, ip)`` for connect code that
resolves by itself (the fast path), ``guarded_transport()`` for httpx (a network backend that
resolves, checks, and connects to the checked address, so a second DNS answer cannot differ),
and ``check_url()`` at create time for an early 400 (names and literal addresses only).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from kernel.config import NetworkSettings
from kernel.errors import InvalidRequest, PermanentError

__all__ = [
    "DEFAULT_DENIED",
    "DENIED_NAMES",
    "PRIVATE",
    "DestinationDenied",
    "NetPolicy",
    "guarded_transport",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENIED = (
    "169.254.0.0/16",  # link-local: AWS, GCP, Azure, OCI metadata (169.254.169.254), ECS
    "fe80::/10",  # link-local
    "fd00:ec2::254/128",  # AWS metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "192.0.0.192/32",  # Oracle Cloud metadata (legacy)
    "224.0.0.0/4",  # multicast
    "ff00::/8",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255
)
DENIED_NAMES = (
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
)
PRIVATE = (
    "127.0.0.0/8",
    "::1/128",
    "0.0.0.0/8",  # connecting to 0.0.0.0 reaches this machine
    "::/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",  # carrier-grade NAT
    "198.18.0.0/15",
    "fc00::/7",
    "fec0::/10",
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", re.IGNORECASE)


class DestinationDenied(PermanentError):
    """The network policy refuses this destination; the message names the setting."""


class _Rules:
    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[Network] = []
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        for entry in entries:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if entry.startswith("."):
                    self.suffixes.append(entry)
                else:
                    self.names.add(entry)

    def match_name(self, host: str) -> bool:
        return host in self.names or any(host.endswith(s) or host == s[1:] for s in self.suffixes)

    def match_address(self, address: Address) -> Network | None:
        for network in self.networks:
            if address.version == network.version and address in network:
                return network
        return None


def normalise(ip: str) -> Address:
    """The address a connection to ``ip`` reaches: IPv4 for mapped and NAT64 IPv6 forms, and
    for the decimal, octal, hex and short IPv4 spellings the resolver accepts (2130706433,
    0x7f.1, 0177.0.0.1). ValueError when ``ip`` is a host name."""
    text = ip.split("%", 1)[0].strip("[]")
    try:
        address: Address = ipaddress.ip_address(text)
    except ValueError:
        if not _LEGACY_IPV4.fullmatch(text):
            raise
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError as exc:
            raise ValueError(f"not an address: {ip!r}") from exc
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


class NetPolicy:
    """The destination policy of one ``network`` settings section."""

    def __init__(self, settings: NetworkSettings) -> None:
        self.allow = _Rules(settings.allow)
        self.deny = _Rules(settings.deny)
        self.default = _Rules((*DEFAULT_DENIED, *DENIED_NAMES))
        self.private = _Rules((*PRIVATE, "localhost", ".localhost"))
        self.deny_private = settings.deny_private

    def refusal(self, host: str, ip: str | None = None) -> str | None:
        """Why a connection to ``host`` (at ``ip``, once resolved) is refused; None if not."""
        name = host.strip("[]").lower().rstrip(".")
        address: Address | None = None
        for candidate in (ip, name):
            if candidate is None:
                continue
            try:
                address = normalise(candidate)
            except ValueError:
                continue
            break
        if self.allow.match_name(name) or (
            address is not None and self.allow.match_address(address) is not None
        ):
            return None
        shown = name if address is None or str(address) == name else f"{name} ({address})"
        if self.deny.match_name(name):
            return f"{shown} is refused by the network.deny setting"
        if address is not None:
            denied = self.deny.match_address(address)
            if denied is not None:
                return f"{shown} is refused by the network.deny setting ({denied})"
        if self.default.match_name(name) or (
            address is not None and self.default.match_address(address) is not None
        ):
            return (
                f"{shown} is a link-local, cloud metadata or reserved address, refused by "
                "default (add it to the network.allow setting to reach it)"
            )
        if self.deny_private and (
            self.private.match_name(name)
            or (address is not None and self.private.match_address(address) is not None)
        ):
            return f"{shown} is a loopback or private address, refused by network.deny_private"
        return None

    def check_address(self, host: str, ip: str) -> None:
        """Raise DestinationDenied unless a connection to ``host`` at ``ip`` is allowed (the
        fast path's ``CheckAddress``: called for each resolved address before connecting)."""
        reason = self.refusal(host, ip)
        if reason is not None:
            raise DestinationDenied(f"Connection refused by the network policy: {reason}.")

    def check_connect(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and return its addresses, all allowed (blocking: for worker
        threads). Raises DestinationDenied when any of them is refused, OSError when the
        name does not resolve."""
        self.check_name(host)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for ip in addresses:
            self.check_address(host, ip)
        return addresses

    async def resolve(self, host: str, port: int) -> list[str]:
        """``check_connect`` for the event loop."""
        self.check_name(host)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for ip in addresses:
            self.check_address(host, ip)
        return addresses

    def check_name(self, host: str) -> None:
        """The checks that need no resolving: denied names, and IP literals."""
        reason = self.refusal(host)
        if reason is not None:
            raise DestinationDenied(f"Connection refused by the network policy: {reason}.")

    def check_url(self, url: str, *, param: str = "url") -> None:
        """At create: an ``http(s)`` URL whose host is a refused name or address (in any
        spelling) is an InvalidRequest naming the setting. Names are not resolved here (no
        lookups from the API); the connections are checked when they are made."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return
        try:
            self.check_name(parts.hostname)
        except DestinationDenied as exc:
            raise InvalidRequest(exc.message, param=param, code="destination_denied") from exc


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked address."""

    def __init__(self, policy: NetPolicy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend signature
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.policy.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"Timed out resolving {host}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{exc.strerror or exc} ({host})") from exc
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self.inner.connect_tcp(
                    ip, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last or httpcore.ConnectError(f"{host} resolved to no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend signature
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("Unix sockets are not a download destination")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: NetPolicy, verify: ssl.SSLContext) -> None:
        super().__init__(verify=verify)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(policy),
        )


def guarded_transport(policy: NetPolicy, verify: ssl.SSLContext) -> httpx.AsyncBaseTransport:
    """An httpx transport whose every connection (each redirect hop too) goes only to
    addresses the policy allows. Proxies from the environment are mounted by httpx beside it;
    through a proxy only the host name is checked (by the caller's request hook)."""
    return _GuardedTransport(policy, verify)
