"""The official Python SDK (PyPI `mixpanel` 5.4.1) against a real `peoplebase serve` process.

Every people call goes through the unmodified SDK and its HTTP consumer (`Consumer`, and
`BufferedConsumer`, which batches). The SDK raises `MixpanelException` whenever the answer's
`status` is not 1, so a call that returns means Peoplebase accepted it. The profiles are then
read back over `/api/query/engage` and compared, whole, to what Mixpanel's semantics give
(SPEC §3-§5); the expected profiles are written out by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from mixpanel import BufferedConsumer, Consumer, Mixpanel, MixpanelException

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e

TOKEN = "sdk-token"
# An hour ago, on a whole second: every $time below is in the past and inside the window.
T0 = float(int(time.time()) - 3600)


def seen(t: float) -> str:
    """`$last_seen` as Mixpanel formats it: UTC, to the second."""
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%S")


class ClockedMixpanel(Mixpanel):
    """The official client, with the clock it stamps `$time` from set by the test.

    The SDK stamps every people update with `time.time()` (float seconds) from `_now`;
    fixing it makes `$time`, and so `$last_seen`, known in advance.
    """

    def __init__(self, token: str, consumer: Any) -> None:
        super().__init__(token, consumer=consumer)
        self.clock = T0

    def at(self, t: float) -> ClockedMixpanel:
        self.clock = t
        return self

    def _now(self) -> float:
        return self.clock


def all_profiles(server: ServerProcess, token: str = TOKEN) -> dict[str, dict[str, Any]]:
    body = server.query(token)
    assert body["status"] == "ok"
    assert body["total"] == len(body["results"])
    return {r["$distinct_id"]: r["$properties"] for r in body["results"]}


def consumer_for(kind: str, url: str) -> Any:
    if kind == "consumer":
        return Consumer(people_url=f"{url}/engage")
    # A small buffer so the calls below travel as several multi-record batches.
    return BufferedConsumer(max_size=4, people_url=f"{url}/engage")


def flush(mp: Mixpanel) -> None:
    if isinstance(mp._consumer, BufferedConsumer):
        mp._consumer.flush()


@pytest.mark.parametrize("kind", ["consumer", "buffered"])
def test_every_people_call(server: ServerProcess, kind: str) -> None:
    mp = ClockedMixpanel(TOKEN, consumer_for(kind, server.url))

    # alice: every operation, in $time order
    mp.at(T0 + 1).people_set(
        "alice",
        {"name": "Alice", "plan": "free", "tags": ["a"], "signup": datetime(2024, 1, 2, 3, 4, 5)},
    )
    mp.at(T0 + 2).people_set_once("alice", {"plan": "pro", "first_seen": "web"})
    mp.at(T0 + 3).people_increment("alice", {"logins": 1, "credits": 2.5})
    mp.at(T0 + 4).people_increment("alice", {"logins": 2, "credits": -1})
    mp.at(T0 + 5).people_append("alice", {"events": "signup"})
    mp.at(T0 + 6).people_append("alice", {"events": {"kind": "login", "n": 1}})
    mp.at(T0 + 7).people_union("alice", {"tags": ["a", "b", "b"], "colors": ["red"]})
    mp.at(T0 + 8).people_remove("alice", {"tags": "a"})
    mp.at(T0 + 9).people_unset("alice", ["first_seen"])
    mp.at(T0 + 10).people_track_charge("alice", 9.99, {"sku": "x-1"})
    mp.at(T0 + 11.5).people_track_charge("alice", 5)

    # bob: charges, then cleared (the Python SDK sends `$unset: ["$transactions"]`)
    mp.at(T0 + 1).people_track_charge("bob", 20)
    mp.at(T0 + 2).people_set("bob", {"email": "bob@example.com"})
    mp.at(T0 + 3).people_clear_charges("bob")

    # carol: deleted, then rebuilt by a later update; an update older than the delete is dropped
    mp.at(T0 + 1).people_set("carol", {"old": True, "plan": "pro"})
    mp.at(T0 + 5).people_delete("carol")
    mp.at(T0 + 6).people_set("carol", {"new": 1})
    mp.at(T0 + 4).people_set("carol", {"too_late": True})

    # dave: deleted; $remove and $unset do not bring a missing profile back
    mp.at(T0 + 1).people_set("dave", {"x": 1})
    mp.at(T0 + 2).people_delete("dave")
    mp.at(T0 + 3).people_remove("dave", {"x": 1})
    mp.at(T0 + 4).people_unset("dave", ["x"])

    # erin: $ignore_time keeps $last_seen away, or as given in $set
    mp.at(T0 + 1).people_set("erin", {"plan": "free"}, meta={"$ignore_time": True})
    mp.at(T0 + 2).people_increment("erin", {"visits": 1}, meta={"$ignore_time": "true"})

    mp.at(T0 + 1).people_set(
        "erin2", {"$last_seen": "2020-05-06T07:08:09", "plan": "pro"}, meta={"$ignore_time": 1}
    )

    # frank: $time given in meta, as seconds and as milliseconds, sent out of order
    mp.at(T0 + 1).people_set("frank", {"v": "late"}, meta={"$time": T0 + 100})
    mp.at(T0 + 2).people_set("frank", {"v": "early", "w": 1}, meta={"$time": int(T0 + 50) * 1000})
    mp.at(T0 + 3).people_set_once("frank", {"w": 2, "z": "ms"}, meta={"$time": (T0 + 60) * 1000})

    # gina: $ip in meta is a modifier, never a property (a TEST-NET address is never located)
    mp.at(T0 + 1).people_set("gina", {"x": 1}, meta={"$ip": "203.0.113.7"})
    mp.at(T0 + 2).people_set("gina", {"y": 2}, meta={"$ip": "0"})
    flush(mp)

    expected = {
        "alice": {
            "name": "Alice",
            "plan": "free",
            "signup": "2024-01-02T03:04:05",
            "tags": ["b"],
            "colors": ["red"],
            "logins": 3,
            "credits": 1.5,
            "events": ["signup", {"kind": "login", "n": 1}],
            "$transactions": [{"sku": "x-1", "$amount": 9.99}, {"$amount": 5}],
            "$last_seen": seen(T0 + 11),
        },
        "bob": {"email": "bob@example.com", "$last_seen": seen(T0 + 3)},
        "carol": {"new": 1, "$last_seen": seen(T0 + 6)},
        "erin": {"plan": "free", "visits": 1},
        "erin2": {"plan": "pro", "$last_seen": "2020-05-06T07:08:09"},
        "frank": {"v": "late", "w": 1, "z": "ms", "$last_seen": seen(T0 + 100)},
        "gina": {"x": 1, "y": 2, "$last_seen": seen(T0 + 2)},
    }
    profiles = all_profiles(server)
    assert profiles == expected
    assert type(profiles["alice"]["logins"]) is int


def test_sdk_default_clock(server: ServerProcess) -> None:
    """Without a fixed clock the SDK sends `time.time()`; `$last_seen` falls within the calls."""
    mp = Mixpanel(TOKEN, consumer=Consumer(people_url=f"{server.url}/engage"))
    before = time.time()
    mp.people_set("now", {"a": 1})
    mp.people_increment("now", {"n": 2})
    mp.people_union("now", {"u": "x"})
    after = time.time()
    profile = all_profiles(server)["now"]
    last_seen = profile.pop("$last_seen")
    assert seen(before) <= last_seen <= seen(after)
    assert profile == {"a": 1, "n": 2, "u": ["x"]}


def test_sdk_raises_on_rejected_update(server: ServerProcess) -> None:
    """An invalid record answers `status: 0` with Mixpanel's message, which the SDK raises."""
    mp = Mixpanel("", consumer=Consumer(people_url=f"{server.url}/engage"))
    with pytest.raises(MixpanelException, match=r"\$token, missing or empty"):
        mp.people_set("x", {"a": 1})
    bad = Mixpanel(TOKEN, consumer=Consumer(people_url=f"{server.url}/engage"))
    with pytest.raises(MixpanelException, match=r"\$time, must be a number"):
        bad.people_set("x", {"a": 1}, meta={"$time": "yesterday"})
    with pytest.raises(MixpanelException, match=r"\$set, must be an object"):
        bad.people_set("x", ["not", "an", "object"])
    # Nothing of the rejected updates was stored: not even the project was created.
    listed = subprocess.run(
        [sys.executable, "-m", "peoplebase", "projects", "list", "--json", "--db", str(server.db)],
        check=True,
        capture_output=True,
    )
    assert json.loads(listed.stdout) == []
    mp_ok = Mixpanel(TOKEN, consumer=Consumer(people_url=f"{server.url}/engage"))
    mp_ok.people_set("x", {"a": 1})
    assert list(all_profiles(server)) == ["x"]


def test_buffered_consumer_batches(server: ServerProcess) -> None:
    """A few hundred updates over seven profiles, sent by BufferedConsumer in batches of 50."""
    mp = ClockedMixpanel(TOKEN, BufferedConsumer(max_size=50, people_url=f"{server.url}/engage"))
    count = 350
    for i in range(count):
        did = f"user-{i % 7}"
        mp.at(T0 + i)
        if i % 3 == 0:
            mp.people_increment(did, {"n": 1, "total": i})
        elif i % 3 == 1:
            mp.people_append(did, {"seq": i})
        else:
            mp.people_union(did, {"mod5": [i % 5]})
    mp._consumer.flush()

    profiles = all_profiles(server)
    assert sorted(profiles) == [f"user-{k}" for k in range(7)]
    for k in range(7):
        mine = [i for i in range(count) if i % 7 == k]
        adds = [i for i in mine if i % 3 == 0]
        mod5: list[int] = []
        for i in mine:
            if i % 3 == 2 and i % 5 not in mod5:
                mod5.append(i % 5)
        assert profiles[f"user-{k}"] == {
            "n": len(adds),
            "total": sum(adds),
            "seq": [i for i in mine if i % 3 == 1],
            "mod5": mod5,
            "$last_seen": seen(T0 + mine[-1]),
        }
