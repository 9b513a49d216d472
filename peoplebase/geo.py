"""Geolocation at ingestion (SPEC §5): which address to look up, and the lookup interface.

The address is the record's `$ip` if it has one (`0`/`"0"` turn geolocation off, even when the
request said `ip=1`), else the client address unless the request said `ip=0` (the caller then
passes None). Private, loopback and otherwise unroutable addresses are never looked up. The IP
is never stored: only the resolved properties travel with the update. `$latitude`/`$longitude`
are accepted and ignored (no reverse-geocoding source is configured), so they do not stop the
IP lookup.

Lookups come from a provider (`geo_providers`): a MaxMind-format `.mmdb` file, or the embedded
country-level source.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, Protocol

from .types import Props


class GeoLookup(Protocol):
    def lookup(self, ip: str) -> Props | None:
        """`$city`, `$region`, `$country_code`, `$timezone` (any subset), or None.

        `ip` is already normalized by `routable_address`.
        """
        ...


@functools.lru_cache(maxsize=65_536)
def routable_address(ip: str) -> str | None:
    """The canonical form of a globally routable unicast address, else None.

    IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack socket reports for an
    IPv4 peer) are read as the IPv4 address they carry. Cached: `is_global` is slow, and the
    same few addresses come again and again.
    """
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            return None
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
    if not addr.is_global or addr.is_multicast:
        return None
    return str(addr)


def routable(ip: str) -> bool:
    return routable_address(ip) is not None


def record_ip_disables(value: Any) -> bool:
    return value in (0, "0") and value is not False


class Geolocator:
    """Callable used by the record validator: (raw record, request address) → geo properties."""

    def __init__(self, lookup: GeoLookup) -> None:
        self.lookup = lookup

    def __call__(self, raw: dict[str, Any], request_ip: str | None) -> Props | None:
        value = raw.get("$ip")
        if value is not None:
            # A record `$ip` wins over the request address and over `ip=0`.
            if record_ip_disables(value) or not isinstance(value, str):
                return None
            ip = value
        elif request_ip is None:
            return None
        else:
            ip = request_ip
        address = routable_address(ip)
        if address is None:
            return None
        found = self.lookup.lookup(address)
        return dict(found) if found else None
