"""Where geolocation answers come from: a `.mmdb` file, or the embedded country source.

- `MmdbLookup` reads any MaxMind-format database the user supplies (GeoLite2-City,
  GeoIP2-City, DB-IP City Lite, IPinfo Lite, ...), in MaxMind's nested schema or the flat
  schemas other vendors use. It notices when the file is replaced on disk (checked at most once
  per `check_interval` seconds) and `reload()` forces a re-read (the server calls it on SIGHUP).
- `CountryLookup` is the default when no file is given: the `iptocc` package embeds
  country-level data built from the Regional Internet Registries' public delegation files, so
  it fills `$country_code` only.

Both cache answers in an LRU (the validator asks once per record); a reload empties the cache.
`open_geo(setting)` turns the `geoip_db` setting into one of them, or None when it is `off`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .types import Props

log = logging.getLogger(__name__)

CACHE_SIZE = 65_536
CHECK_INTERVAL = 1.0
EMBEDDED = ""
OFF = "off"
_COUNTRY = re.compile(r"^[A-Z]{2}$")
# Codes the registries use that are not countries (EU: RIPE's "Europe", AP: APNIC's
# "Asia/Pacific", ZZ: unknown).
_NOT_COUNTRIES = frozenset({"EU", "AP", "ZZ", "XX"})


class GeoDatabaseError(Exception):
    """The configured geolocation database cannot be opened or read."""


def _country(code: Any) -> str | None:
    if not isinstance(code, str):
        return None
    code = code.strip().upper()
    if not _COUNTRY.match(code) or code in _NOT_COUNTRIES:
        return None
    return code


def _name(node: Any) -> str | None:
    """English name of a MaxMind-schema node (`{"names": {"en": ...}}`), else any name."""
    if not isinstance(node, Mapping):
        return None
    names = node.get("names")
    if not isinstance(names, Mapping) or not names:
        return None
    name = names.get("en")
    if not isinstance(name, str):
        name = next((v for v in names.values() if isinstance(v, str)), None)
    return name or None


def _text(record: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def properties_from_record(record: Any) -> Props | None:
    """A database record → `$city`, `$region`, `$country_code`, `$timezone` (those it has).

    MaxMind's schema (GeoLite2/GeoIP2, DB-IP): `city.names`, `subdivisions[0].names`,
    `country.iso_code` (else `registered_country.iso_code`), `location.time_zone`. Flat schemas
    (IPinfo Lite, ip-location-db): `country_code` or a two-letter `country`, `city`,
    `region`/`state1`/`subdivision`, `timezone`/`time_zone`.
    """
    if not isinstance(record, Mapping):
        return None
    out: Props = {}
    country_node = record.get("country")
    if isinstance(country_node, Mapping):
        code = _country(country_node.get("iso_code"))
        if code is None:
            registered = record.get("registered_country")
            if isinstance(registered, Mapping):
                code = _country(registered.get("iso_code"))
    else:
        code = _country(record.get("country_code")) or _country(country_node)
    city_node = record.get("city")
    city = _name(city_node) if isinstance(city_node, Mapping) else _text(record, "city")
    subdivisions = record.get("subdivisions")
    if isinstance(subdivisions, list) and subdivisions:
        region = _name(subdivisions[0])
    else:
        region = _text(record, "region", "state1", "subdivision", "subdivision_1_name")
    location = record.get("location")
    if isinstance(location, Mapping):
        timezone = _text(location, "time_zone")
    else:
        timezone = _text(record, "timezone", "time_zone")
    if city:
        out["$city"] = city
    if region:
        out["$region"] = region
    if code:
        out["$country_code"] = code
    if timezone:
        out["$timezone"] = timezone
    return out or None


class _Cache:
    """An LRU of lookups, emptied on reload."""

    def __init__(self, resolve: Callable[[str], Props | None], size: int) -> None:
        self.cached = functools.lru_cache(maxsize=size)(resolve)

    def clear(self) -> None:
        self.cached.cache_clear()

    def info(self) -> Any:
        return self.cached.cache_info()


class CountryLookup:
    """The embedded default: country codes from the `iptocc` package (RIR delegation data)."""

    description = "embedded country data (iptocc, Regional Internet Registry delegations)"

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        from iptocc import country_code

        self._country_code = country_code
        self._cache = _Cache(self._resolve, cache_size)

    def _resolve(self, ip: str) -> Props | None:
        code = _country(self._country_code(ip))
        return {"$country_code": code} if code else None

    def lookup(self, ip: str) -> Props | None:
        return self._cache.cached(ip)

    def reload(self) -> bool:
        return False

    def cache_info(self) -> Any:
        return self._cache.info()


def _file_state(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ino, st.st_size)


class MmdbLookup:
    """A MaxMind-format database file, re-opened when the file on disk changes.

    Replace the file atomically (write a new file, then rename it over the old one, as
    MaxMind's `geoipupdate` does): the database is memory-mapped, and a file rewritten in place
    can be read half-written.
    """

    def __init__(
        self,
        path: str,
        check_interval: float = CHECK_INTERVAL,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.path = path
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._reader, self._state = self._open()
        self._next_check = time.monotonic() + check_interval
        self._cache = _Cache(self._resolve, cache_size)
        self.reloads = 0

    @property
    def description(self) -> str:
        meta = self._reader.metadata()
        built = time.strftime("%Y-%m-%d", time.gmtime(meta.build_epoch))
        return f"{meta.database_type} ({self.path}, built {built})"

    def _open(self) -> tuple[Any, tuple[int, int, int]]:
        import maxminddb

        try:
            state = _file_state(self.path)
            reader = maxminddb.open_database(self.path, maxminddb.MODE_AUTO)
        except FileNotFoundError as exc:
            raise GeoDatabaseError(f"geoip database {self.path}: no such file") from exc
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDatabaseError(
                f"geoip database {self.path}: not a readable MaxMind (.mmdb) file: {exc}"
            ) from exc
        return reader, state

    def _resolve(self, ip: str) -> Props | None:
        try:
            record = self._reader.get(ip)
        except ValueError:
            return None  # e.g. an IPv6 address asked of an IPv4-only database
        return properties_from_record(record)

    def lookup(self, ip: str) -> Props | None:
        if self.check_interval >= 0 and time.monotonic() >= self._next_check:
            self._check()
        return self._cache.cached(ip)

    def _check(self) -> None:
        self._next_check = time.monotonic() + self.check_interval
        try:
            changed = _file_state(self.path) != self._state
        except OSError:
            return  # the file is being replaced, or gone: keep serving from the one we have
        if changed:
            self.reload()

    def reload(self) -> bool:
        """Re-open the file; on failure keep the current database. True when re-opened."""
        with self._lock:
            try:
                reader, state = self._open()
            except GeoDatabaseError as exc:
                log.error("geolocation: keeping the current database: %s", exc)
                # Do not retry a broken file on every check; wait for it to change again.
                try:
                    self._state = _file_state(self.path)
                except OSError:
                    pass
                return False
            old, self._reader, self._state = self._reader, reader, state
            self._cache.clear()
            self.reloads += 1
        log.info("geolocation: reloaded %s", self.description)
        old.close()
        return True

    def close(self) -> None:
        self._reader.close()

    def cache_info(self) -> Any:
        return self._cache.info()


def open_geo(
    setting: str, check_interval: float = CHECK_INTERVAL
) -> MmdbLookup | CountryLookup | None:
    """The `geoip_db` setting → a lookup: a path, `""` (embedded country data) or `off`."""
    value = setting.strip()
    if value.lower() == OFF:
        return None
    if value == EMBEDDED:
        return CountryLookup()
    return MmdbLookup(os.path.expanduser(value), check_interval=check_interval)


__all__ = [
    "CountryLookup",
    "GeoDatabaseError",
    "MmdbLookup",
    "open_geo",
    "properties_from_record",
]
