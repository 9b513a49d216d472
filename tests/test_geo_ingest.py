"""Geolocation through /engage (SPEC §5): every precedence rule, on a real app and SQLite file."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from tests.geo_fixtures import (
    LONDON,
    LONDON_IP,
    MILTON,
    MILTON_IP,
    PARIS,
    PARIS_IP6,
    TOKYO,
    TOKYO_IP6,
    write_city_db,
)

PEER = "203.0.113.9"  # the test client's socket address: a documentation range, never located
TOKEN = "geo"


class Geo:
    def __init__(self, app: PeoplebaseApp) -> None:
        self.app = app
        transport = httpx.ASGITransport(app=app, client=(PEER, 5555))
        self.http = httpx.AsyncClient(transport=transport, base_url="http://peoplebase.test")

    async def send(
        self, *records: dict[str, Any], headers: dict[str, str] | None = None, **form: str
    ) -> None:
        body = {"data": orjson.dumps(list(records)).decode(), "verbose": "1", **form}
        r = await self.http.post("/engage", data=body, headers=headers or {})
        assert r.json() == {"status": 1, "error": None}

    def profile(self, did: str) -> dict[str, Any] | None:
        project = self.app.store.project_by_token(TOKEN)
        assert project is not None
        found = dict(self.app.store.get_profiles(project.id, [did]))
        if did not in found:
            return None
        props = dict(found[did])
        props.pop("$last_seen", None)
        return props


def rec(did: str, **extra: Any) -> dict[str, Any]:
    return {"$token": TOKEN, "$distinct_id": did, **extra}


async def make(settings: Settings) -> AsyncIterator[Geo]:
    app = PeoplebaseApp(settings)
    app.startup()
    g = Geo(app)
    try:
        yield g
    finally:
        await g.http.aclose()
        app.shutdown()


@pytest.fixture
def city_db(tmp_path: Path) -> Path:
    return write_city_db(tmp_path / "city.mmdb")


@pytest.fixture
async def geo(tmp_path: Path, city_db: Path) -> AsyncIterator[Geo]:
    settings = Settings(
        db=str(tmp_path / "geo.db"),
        tokens="open",
        geoip_db=str(city_db),
        trusted_proxies="203.0.113.0/24",
    )
    async for g in make(settings):
        yield g


@pytest.fixture
async def untrusting(tmp_path: Path, city_db: Path) -> AsyncIterator[Geo]:
    settings = Settings(db=str(tmp_path / "geo.db"), tokens="open", geoip_db=str(city_db))
    async for g in make(settings):
        yield g


@pytest.fixture
async def default(tmp_path: Path) -> AsyncIterator[Geo]:
    async for g in make(Settings(db=str(tmp_path / "geo.db"), tokens="open")):
        yield g


XFF = {"X-Forwarded-For": LONDON_IP}


async def test_client_address_through_trusted_proxy(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"plan": "pro"}}), headers=XFF)
    assert geo.profile("a") == {"plan": "pro", **LONDON}


async def test_forwarded_header_through_trusted_proxy(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}}), headers={"Forwarded": f'for="[{TOKYO_IP6}]"'})
    assert geo.profile("a") == {"x": 1, **TOKYO}


async def test_spoofed_header_from_untrusted_peer_ignored(untrusting: Geo) -> None:
    await untrusting.send(rec("a", **{"$set": {"x": 1}}), headers=XFF)
    assert untrusting.profile("a") == {"x": 1}


async def test_record_ip_beats_request_address(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}, "$ip": MILTON_IP}), headers=XFF)
    assert geo.profile("a") == {"x": 1, **MILTON}


async def test_record_ip_beats_ip_0(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}, "$ip": PARIS_IP6}), headers=XFF, ip="0")
    assert geo.profile("a") == {"x": 1, **PARIS}


async def test_ip_0_turns_off_request_address(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}}), headers=XFF, ip="0")
    r = await geo.http.get(
        "/engage",
        params={"data": orjson.dumps(rec("b", **{"$set": {"x": 1}})).decode(), "ip": "0"},
        headers=XFF,
    )
    assert r.text == "1"
    assert geo.profile("a") == {"x": 1}
    assert geo.profile("b") == {"x": 1}


async def test_ip_1_uses_request_address(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}}), headers=XFF, ip="1")
    assert geo.profile("a") == {"x": 1, **LONDON}


@pytest.mark.parametrize("value", [0, "0"])
async def test_record_ip_zero_disables(geo: Geo, value: Any) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}, "$ip": value}), headers=XFF, ip="1")
    assert geo.profile("a") == {"x": 1}


async def test_explicit_geo_in_set_wins(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"$city": "Mine"}, "$ip": MILTON_IP}))
    assert geo.profile("a") == {"$city": "Mine"}


async def test_set_once_records_are_located(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set_once": {"first": 1}, "$ip": TOKYO_IP6}))
    assert geo.profile("a") == {"first": 1, **TOKYO}


@pytest.mark.parametrize(
    "ops",
    [
        {"$add": {"n": 1}},
        {"$union": {"l": [1]}},
        {"$append": {"l": 1}},
        {"$unset": ["zz"]},
    ],
)
async def test_other_operations_are_not_located(geo: Geo, ops: dict[str, Any]) -> None:
    await geo.send(rec("a", **{"$set": {"k": 1}, "$ip": "0"}))
    await geo.send(rec("a", **ops, **{"$ip": LONDON_IP}), headers=XFF)
    profile = geo.profile("a")
    assert profile is not None
    assert not set(profile) & {"$city", "$region", "$country_code", "$timezone"}


async def test_each_set_overwrites_the_location(geo: Geo) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}, "$ip": LONDON_IP}))
    await geo.send(rec("a", **{"$set": {"x": 2}, "$ip": "89.160.20.129"}))
    # the second network has no city or region: those from London stay, the rest is replaced
    assert geo.profile("a") == {
        "x": 2,
        "$city": "London",
        "$region": "England",
        "$country_code": "SE",
        "$timezone": "Europe/Stockholm",
    }


async def test_private_and_loopback_addresses_give_no_location(geo: Geo) -> None:
    for i, ip in enumerate(["10.0.0.1", "127.0.0.1", "192.168.1.1", "::1", "fe80::1"]):
        await geo.send(rec(f"p{i}", **{"$set": {"x": 1}, "$ip": ip}))
        await geo.send(rec(f"q{i}", **{"$set": {"x": 1}}), headers={"X-Forwarded-For": ip})
        assert geo.profile(f"p{i}") == {"x": 1}
        assert geo.profile(f"q{i}") == {"x": 1}


async def test_latitude_longitude_accepted_not_stored(geo: Geo) -> None:
    await geo.send(
        rec("a", **{"$set": {"x": 1}, "$latitude": 35.0, "$longitude": 139.0}), headers=XFF
    )
    assert geo.profile("a") == {"x": 1, **LONDON}


async def test_ip_is_never_stored(geo: Geo, tmp_path: Path) -> None:
    marker = "216.160.83.61"
    await geo.send(rec("a", **{"$set": {"x": 1}, "$ip": marker, "$time": time.time() - 60}))
    await geo.send(rec("b", **{"$set": {"x": 1}}), headers={"X-Forwarded-For": marker})
    assert geo.profile("a") == {"x": 1, **MILTON}
    assert geo.profile("b") == {"x": 1, **MILTON}
    geo.app.shutdown()  # the store closed: everything is in the files
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("geo.db*"))
    assert b"Milton" in stored
    assert marker.encode() not in stored


async def test_location_is_kept_for_replays(geo: Geo) -> None:
    t = time.time() - 600
    # the later update arrives first; the earlier one then makes the profile be replayed
    await geo.send(rec("a", **{"$set": {"x": 2}, "$ip": LONDON_IP, "$time": t + 10}))
    await geo.send(rec("a", **{"$set": {"x": 1, "y": 1}, "$ip": TOKYO_IP6, "$time": t}))
    assert geo.profile("a") == {"x": 2, "y": 1, **LONDON}


async def test_embedded_default_gives_country_out_of_the_box(default: Geo) -> None:
    await default.send(rec("a", **{"$set": {"x": 1}, "$ip": "8.8.8.8"}))
    await default.send(rec("b", **{"$set": {"x": 1}, "$ip": "2001:67c:2e8:22::c100:68b"}))
    assert default.profile("a") == {"x": 1, "$country_code": "US"}
    assert default.profile("b") == {"x": 1, "$country_code": "NL"}


async def test_geoip_off(tmp_path: Path) -> None:
    settings = Settings(db=str(tmp_path / "geo.db"), tokens="open", geoip_db="off")
    async for g in make(settings):
        assert g.app.validator.geo is None
        await g.send(rec("a", **{"$set": {"x": 1}, "$ip": "8.8.8.8"}))
        assert g.profile("a") == {"x": 1}


async def test_database_replaced_while_serving(geo: Geo, city_db: Path) -> None:
    await geo.send(rec("a", **{"$set": {"x": 1}, "$ip": LONDON_IP}))
    assert geo.profile("a") == {"x": 1, **LONDON}
    write_city_db(city_db, {"81.2.69.0/24": PARIS})
    geo.app.reload_geo()  # what SIGHUP does
    await geo.send(rec("b", **{"$set": {"x": 1}, "$ip": LONDON_IP}))
    assert geo.profile("b") == {"x": 1, **PARIS}
