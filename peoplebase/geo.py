"""Geolocation at ingestion (SPEC §5): which address to look up, and the lookup interface.

The address is the record's `$ip` if it has one (`0`/`"0"` turn geolocation off), else the
client address unless the request said `ip=0`. Private, loopback and otherwise unroutable
addresses are never looked up. The IP is never stored: only the resolved properties travel
with the update.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from .types import Props


class GeoLookup(Protocol):
    def lookup(self, ip: str) -> Props | None:
        """`$city`, `$region`, `$country_code`, `$timezone` (any subset), or None."""
        ...


def routable(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return False
    return addr.is_global and not addr.is_multicast


def record_ip_disables(value: Any) -> bool:
    return value in (0, "0") and value is not False


class Geolocator:
    """Callable used by the record validator: (raw record, request address) → geo properties."""

    def __init__(self, lookup: GeoLookup) -> None:
        self.lookup = lookup

    def __call__(self, raw: dict[str, Any], request_ip: str | None) -> Props | None:
        if "$ip" in raw:
            value = raw["$ip"]
            if record_ip_disables(value) or not isinstance(value, str):
                return None
            ip = value
        elif request_ip is None:
            return None
        else:
            ip = request_ip
        if not routable(ip):
            return None
        found = self.lookup.lookup(ip.strip())
        return dict(found) if found else None
