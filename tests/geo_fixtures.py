"""Small MaxMind-format (.mmdb) databases written by the tests, with known networks.

`write_city_db` writes a database in MaxMind's City schema (what GeoLite2-City, GeoIP2-City
and DB-IP City Lite use); `write_flat_db` one in the flat schema of IPinfo Lite. The networks
are real, globally routed ones; the places are what the fixture says, not the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet

LONDON = {
    "$city": "London",
    "$region": "England",
    "$country_code": "GB",
    "$timezone": "Europe/London",
}
MILTON = {
    "$city": "Milton",
    "$region": "Washington",
    "$country_code": "US",
    "$timezone": "America/Los_Angeles",
}
TOKYO = {"$city": "Tokyo", "$region": "Tokyo", "$country_code": "JP", "$timezone": "Asia/Tokyo"}
PARIS = {
    "$city": "Paris",
    "$region": "Île-de-France",
    "$country_code": "FR",
    "$timezone": "Europe/Paris",
}

# address inside the network → what the fixture says about it
LONDON_IP = "81.2.69.160"
MILTON_IP = "216.160.83.58"
TOKYO_IP6 = "2400:cb00::1234"
PARIS_IP6 = "2a01:e00::1"
COUNTRY_ONLY_IP = "89.160.20.129"  # a network with a country and no city: SE

CITY_NETWORKS: dict[str, dict[str, str]] = {
    "81.2.69.0/24": LONDON,
    "216.160.83.56/29": MILTON,
    "2400:cb00::/32": TOKYO,
    "2a01:e00::/26": PARIS,
}


def city_record(place: dict[str, str]) -> dict[str, Any]:
    """A record in MaxMind's City schema, with other languages and fields around the ones used."""
    return {
        "city": {"geoname_id": 1, "names": {"de": place["$city"] + "-de", "en": place["$city"]}},
        "continent": {"code": "XX", "names": {"en": "Somewhere"}},
        "country": {"iso_code": place["$country_code"], "names": {"en": "Country"}},
        "registered_country": {"iso_code": "ZZ", "names": {"en": "Registered"}},
        "subdivisions": [
            {"iso_code": "S1", "names": {"en": place["$region"], "fr": "autre"}},
            {"iso_code": "S2", "names": {"en": "second level"}},
        ],
        "location": {"latitude": 1.5, "longitude": 2.5, "time_zone": place["$timezone"]},
    }


def _write(path: Path, database_type: str, rows: dict[str, dict[str, Any]]) -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type)
    for network, record in rows.items():
        writer.insert_network(IPSet([network]), record)
    tmp = path.with_name(path.name + ".tmp")
    writer.to_db_file(str(tmp))
    os.replace(tmp, path)  # atomic, as a database update should be
    return path


def write_city_db(path: Path, places: dict[str, dict[str, str]] | None = None) -> Path:
    rows = {net: city_record(place) for net, place in (places or CITY_NETWORKS).items()}
    rows["89.160.20.128/25"] = {
        "country": {"iso_code": "SE", "names": {"en": "Sweden"}},
        "location": {"time_zone": "Europe/Stockholm"},
    }
    return _write(path, "Test-City", rows)


def write_flat_db(path: Path) -> Path:
    """IPinfo Lite's schema: flat, country level, with ASN fields."""
    rows = {
        "81.2.69.0/24": {
            "country": "United Kingdom",
            "country_code": "GB",
            "continent": "Europe",
            "continent_code": "EU",
            "asn": "AS20712",
            "as_name": "Example",
        },
        "2400:cb00::/32": {"country": "Japan", "country_code": "JP", "continent_code": "AS"},
    }
    return _write(path, "ipinfo lite.mmdb", rows)
