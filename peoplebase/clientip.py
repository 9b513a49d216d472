"""The client address of a request, through trusted reverse proxies only (SPEC §5).

The address is the socket peer, unless the peer is one of the configured trusted proxies
(`trusted_proxies`, a comma-separated list of addresses or CIDR networks). Then the forwarding
chain is read from the right, skipping every hop that is itself a trusted proxy; the first
address that is not a trusted proxy is the client. A hop that cannot be read (`unknown`, an
obfuscated `_name`, garbage) means the client is unknown (None): nothing a client wrote to the
left of it can be believed.

The chain is `X-Forwarded-For` when the request has one, else the `for=` parameters of
`Forwarded` (RFC 7239). Headers from peers that are not trusted proxies are ignored, so a client
cannot choose its own address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Headers = Iterable[tuple[bytes, bytes]]


class InvalidTrustedProxies(ValueError):
    """The `trusted_proxies` setting names something that is not an address or network."""


def parse_trusted(value: str) -> tuple[Network, ...]:
    """`"10.0.0.0/8, 127.0.0.1, ::1"` → networks; InvalidTrustedProxies for a bad entry."""
    networks = []
    for item in value.replace(" ", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise InvalidTrustedProxies(
                f"trusted_proxies: {item!r} is not an IP address or CIDR network "
                "(expected e.g. 10.0.0.0/8, 127.0.0.1, ::1)"
            ) from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    """One hop as a proxy writes it → an address (ports, brackets and quotes removed)."""
    text = text.strip().strip('"').strip()
    if not text:
        return None
    if text.startswith("["):  # [2001:db8::1] or [2001:db8::1]:443
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # 192.0.2.1:8080
        text = text.split(":", 1)[0]
    try:
        addr: Address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def forwarded_for(value: str) -> list[str]:
    """The `for=` value of each element of a `Forwarded` header ("" where an element has none)."""
    hops = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, sep, item = pair.partition("=")
            if sep and name.strip().lower() == "for":
                found = item.strip()
        hops.append(found)
    return hops


class ClientAddress:
    """Resolves the client address of a request given the trusted proxies."""

    def __init__(self, trusted: str | Sequence[Network] = ()) -> None:
        self.trusted = parse_trusted(trusted) if isinstance(trusted, str) else tuple(trusted)

    def is_trusted(self, addr: Address) -> bool:
        return any(addr.version == net.version and addr in net for net in self.trusted)

    def resolve(self, peer: str | None, headers: Headers) -> str | None:
        """The client's address as a string, or None when it cannot be known."""
        if peer is None or not self.trusted:
            return peer
        hop = _address(peer)
        if hop is None or not self.is_trusted(hop):
            return peer
        xff: list[str] = []
        fwd: list[str] = []
        for name, value in headers:
            if name == b"x-forwarded-for":
                xff.extend(v for v in value.decode("latin-1").split(",") if v.strip())
            elif name == b"forwarded":
                fwd.extend(forwarded_for(value.decode("latin-1")))
        chain = xff or fwd
        for entry in reversed(chain):
            addr = _address(entry)
            if addr is None:
                return None
            hop = addr
            if not self.is_trusted(addr):
                break
        return str(hop)


__all__ = ["ClientAddress", "InvalidTrustedProxies", "forwarded_for", "parse_trusted"]
