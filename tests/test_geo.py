"""Geolocation: address choice (SPEC §5), the .mmdb reader, the embedded country data, reloads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from peoplebase.geo import Geolocator, routable_address
from peoplebase.geo_providers import (
    CountryLookup,
    GeoDatabaseError,
    MmdbLookup,
    open_geo,
    properties_from_record,
)
from tests.geo_fixtures import (
    CITY_NETWORKS,
    COUNTRY_ONLY_IP,
    LONDON,
    LONDON_IP,
    MILTON,
    MILTON_IP,
    PARIS,
    PARIS_IP6,
    TOKYO,
    TOKYO_IP6,
    write_city_db,
    write_flat_db,
)


@pytest.fixture
def city_db(tmp_path: Path) -> Path:
    return write_city_db(tmp_path / "city.mmdb")


class Recording:
    """A lookup that remembers what it was asked (to see which address was chosen)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookup(self, ip: str) -> dict[str, Any] | None:
        self.asked.append(ip)
        return {"$country_code": "ZZ", "asked": ip}


def rec(**extra: Any) -> dict[str, Any]:
    return {"$token": "t", "$distinct_id": "d", "$set": {"a": 1}, **extra}


# --- which address is looked up -------------------------------------------------------------


def test_request_address_is_used_without_record_ip() -> None:
    geo = Geolocator(Recording())
    assert geo(rec(), "8.8.8.8") == {"$country_code": "ZZ", "asked": "8.8.8.8"}


def test_record_ip_beats_request_address() -> None:
    lookup = Recording()
    assert Geolocator(lookup)(rec(**{"$ip": "1.1.1.1"}), "8.8.8.8") is not None
    assert lookup.asked == ["1.1.1.1"]


def test_record_ip_beats_ip_0() -> None:
    # ip=0 reaches the geolocator as "no request address"
    lookup = Recording()
    assert Geolocator(lookup)(rec(**{"$ip": " 9.9.9.9 "}), None) is not None
    assert lookup.asked == ["9.9.9.9"]


def test_ip_0_without_record_ip_means_no_lookup() -> None:
    lookup = Recording()
    assert Geolocator(lookup)(rec(), None) is None
    assert lookup.asked == []


@pytest.mark.parametrize("value", [0, "0", 0.0])
def test_record_ip_zero_disables_even_with_request_address(value: Any) -> None:
    lookup = Recording()
    assert Geolocator(lookup)(rec(**{"$ip": value}), "8.8.8.8") is None
    assert lookup.asked == []


@pytest.mark.parametrize("value", [1, True, False, ["8.8.8.8"], {"ip": "8.8.8.8"}, "not an ip", ""])
def test_record_ip_that_is_not_an_address_gives_no_location(value: Any) -> None:
    lookup = Recording()
    assert Geolocator(lookup)(rec(**{"$ip": value}), "8.8.8.8") is None
    assert lookup.asked == []


def test_record_ip_null_falls_back_to_request_address() -> None:
    lookup = Recording()
    Geolocator(lookup)(rec(**{"$ip": None}), "8.8.8.8")
    assert lookup.asked == ["8.8.8.8"]


def test_latitude_longitude_accepted_and_ip_still_used() -> None:
    lookup = Recording()
    found = Geolocator(lookup)(rec(**{"$latitude": 48.85, "$longitude": 2.35}), "8.8.8.8")
    assert found == {"$country_code": "ZZ", "asked": "8.8.8.8"}


@pytest.mark.parametrize(
    "ip",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "169.254.1.1",
        "100.64.0.1",  # carrier-grade NAT
        "192.0.2.1",  # documentation ranges
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "2001:db8::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
    ],
)
def test_unroutable_addresses_are_never_looked_up(ip: str) -> None:
    lookup = Recording()
    assert Geolocator(lookup)(rec(**{"$ip": ip}), None) is None
    assert Geolocator(lookup)(rec(), ip) is None
    assert lookup.asked == []


@pytest.mark.parametrize(
    ("ip", "canonical"),
    [
        ("8.8.8.8", "8.8.8.8"),
        (" 8.8.8.8\n", "8.8.8.8"),
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("2001:4860:4860:0000:0000:0000:0000:8888", "2001:4860:4860::8888"),
        ("2400:CB00::1", "2400:cb00::1"),
    ],
)
def test_routable_address_is_canonical(ip: str, canonical: str) -> None:
    assert routable_address(ip) == canonical


# --- reading .mmdb records ------------------------------------------------------------------


def test_city_database_ipv4_and_ipv6(city_db: Path) -> None:
    geo = MmdbLookup(str(city_db))
    assert geo.lookup(LONDON_IP) == LONDON
    assert geo.lookup(MILTON_IP) == MILTON
    assert geo.lookup(TOKYO_IP6) == TOKYO
    assert geo.lookup(PARIS_IP6) == PARIS
    assert geo.lookup("8.8.8.8") is None  # not in the database


def test_city_database_through_the_geolocator(city_db: Path) -> None:
    geo = Geolocator(MmdbLookup(str(city_db)))
    assert geo(rec(**{"$ip": f"::ffff:{LONDON_IP}"}), None) == LONDON
    assert geo(rec(), TOKYO_IP6.upper()) == TOKYO


def test_country_only_network_gives_what_it_has(city_db: Path) -> None:
    assert MmdbLookup(str(city_db)).lookup(COUNTRY_ONLY_IP) == {
        "$country_code": "SE",
        "$timezone": "Europe/Stockholm",
    }


def test_flat_schema_ipinfo_lite(tmp_path: Path) -> None:
    geo = MmdbLookup(str(write_flat_db(tmp_path / "ipinfo.mmdb")))
    assert geo.lookup(LONDON_IP) == {"$country_code": "GB"}
    assert geo.lookup(TOKYO_IP6) == {"$country_code": "JP"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (None, None),
        ({}, None),
        ("GB", None),
        ({"country": {"iso_code": "gb"}}, {"$country_code": "GB"}),
        ({"country": {}, "registered_country": {"iso_code": "DE"}}, {"$country_code": "DE"}),
        ({"country": {"iso_code": "EU"}}, None),  # a registry region, not a country
        (
            {"country": "US", "city": "Boston", "region": "Massachusetts"},
            {"$country_code": "US", "$city": "Boston", "$region": "Massachusetts"},
        ),
        (
            {"country_code": "BR", "state1": "São Paulo", "timezone": "America/Sao_Paulo"},
            {"$country_code": "BR", "$region": "São Paulo", "$timezone": "America/Sao_Paulo"},
        ),
        ({"city": {"names": {"fr": "Genève"}}}, {"$city": "Genève"}),  # no English name
        ({"city": {"names": {}}, "subdivisions": [], "location": {}}, None),
    ],
)
def test_properties_from_record(record: Any, expected: Any) -> None:
    assert properties_from_record(record) == expected


def test_lookups_are_cached(city_db: Path) -> None:
    geo = MmdbLookup(str(city_db), check_interval=3600)
    for _ in range(5):
        assert geo.lookup(LONDON_IP) == LONDON
    info = geo.cache_info()
    assert (info.hits, info.misses) == (4, 1)


def test_missing_or_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GeoDatabaseError, match="no such file"):
        MmdbLookup(str(tmp_path / "nope.mmdb"))
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"this is not a database" * 10)
    with pytest.raises(GeoDatabaseError, match="not a readable MaxMind"):
        MmdbLookup(str(bad))


def test_open_geo_setting(city_db: Path) -> None:
    assert open_geo("off") is None
    assert open_geo(" OFF ") is None
    assert isinstance(open_geo(""), CountryLookup)
    chosen = open_geo(str(city_db))
    assert isinstance(chosen, MmdbLookup)
    assert chosen.lookup(LONDON_IP) == LONDON


# --- reloads --------------------------------------------------------------------------------


def replace_with(path: Path, places: dict[str, dict[str, str]]) -> None:
    """Write a new database over `path` atomically, with a visibly different mtime."""
    before = path.stat().st_mtime_ns
    write_city_db(path, places)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_replaced_file_is_reloaded_on_mtime_check(city_db: Path) -> None:
    geo = MmdbLookup(str(city_db), check_interval=0)
    assert geo.lookup(LONDON_IP) == LONDON
    replace_with(city_db, {**CITY_NETWORKS, "81.2.69.0/24": PARIS})
    assert geo.lookup(LONDON_IP) == PARIS  # the cache was emptied too
    assert geo.reloads == 1
    assert geo.lookup(LONDON_IP) == PARIS
    assert geo.reloads == 1  # unchanged file: no second reload


def test_mtime_is_checked_at_most_once_per_interval(city_db: Path) -> None:
    geo = MmdbLookup(str(city_db), check_interval=3600)
    assert geo.lookup(LONDON_IP) == LONDON
    replace_with(city_db, {"81.2.69.0/24": PARIS})
    assert geo.lookup(LONDON_IP) == LONDON  # not checked yet
    assert geo.reload() is True  # what SIGHUP does
    assert geo.lookup(LONDON_IP) == PARIS


def test_broken_replacement_keeps_the_current_database(
    city_db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    geo = MmdbLookup(str(city_db), check_interval=0)
    assert geo.lookup(MILTON_IP) == MILTON
    before = city_db.stat().st_mtime_ns
    broken = city_db.with_name("broken.tmp")
    broken.write_bytes(b"\x00" * 100)
    os.replace(broken, city_db)
    os.utime(city_db, ns=(before + 10**9, before + 10**9))
    with caplog.at_level(logging.ERROR, logger="peoplebase.geo_providers"):
        assert geo.lookup(MILTON_IP) == MILTON
    assert "keeping the current database" in caplog.text
    assert geo.reloads == 0
    replace_with(city_db, {"216.160.83.56/29": TOKYO})
    assert geo.lookup(MILTON_IP) == TOKYO
    assert geo.reloads == 1


def test_removed_file_keeps_the_current_database(city_db: Path) -> None:
    geo = MmdbLookup(str(city_db), check_interval=0)
    city_db.unlink()
    assert geo.lookup(LONDON_IP) == LONDON
    assert geo.reload() is False
    assert geo.lookup(PARIS_IP6) == PARIS


# --- the embedded default -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "country"),
    [
        ("8.8.8.8", "US"),  # Google Public DNS (ARIN)
        ("2001:4860:4860::8888", "US"),
        ("193.0.6.139", "NL"),  # RIPE NCC's own network, Amsterdam
        ("2001:67c:2e8:22::c100:68b", "NL"),  # www.ripe.net over IPv6
        ("202.12.29.205", "AU"),  # APNIC, Brisbane
        ("200.160.4.6", "BR"),  # NIC.br (LACNIC)
        ("1.1.1.1", "AU"),  # APNIC's research prefix, lent to Cloudflare
        ("::ffff:8.8.8.8", "US"),
    ],
)
def test_embedded_country_data_on_well_known_addresses(ip: str, country: str) -> None:
    geo = Geolocator(CountryLookup())
    assert geo(rec(**{"$ip": ip}), None) == {"$country_code": country}


def test_embedded_country_data_knows_nothing_of_private_addresses() -> None:
    assert Geolocator(CountryLookup())(rec(**{"$ip": "192.168.0.1"}), None) is None


def test_embedded_lookups_are_cached() -> None:
    geo = CountryLookup()
    for _ in range(3):
        assert geo.lookup("8.8.8.8") == {"$country_code": "US"}
    assert geo.cache_info().hits == 2
