"""Golden tests: replay what the official SDKs really sent (reference/sdk-captures).

Every request of a scenario the capture server answered normally (`response.mode` "ok", plus
the CORS preflights) is replayed as captured: method, raw path and query, headers, body
bytes. Each answer is checked against SPEC §7, and the stored profiles against two
expectations that do not come from the code under test:

- `tests/golden/<sdk>.json`: profiles derived by hand from the decoded records (checkpoints
  after given requests, and the final state of key profiles);
- `Reference`: a small, independent applier of SPEC §3-§5, run on the capture server's own
  decode of each request, for a whole-capture comparison of every profile.

Records without `$time` take the receipt time, so their `$last_seen` is checked for format
and range only (written `<receipt>` in the golden files).
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import CAPTURES, AppClient

pytestmark = pytest.mark.all_backends  # the replays run on SQLite and on PostgreSQL

GOLDEN = Path(__file__).resolve().parent / "golden"
SDKS = ["python", "node", "browser"]
RECEIPT = "<receipt>"
LAST_SEEN_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")
DROP_HEADERS = {"host", "content-length", "connection", "transfer-encoding"}
WINDOW = 7 * 86400.0
SKEW = 60.0


def load_capture(sdk: str) -> list[dict[str, Any]]:
    path = CAPTURES / f"{sdk}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(lines, key=lambda line: line["seq"])  # arrival order at the capture server


def route_of(line: dict[str, Any]) -> str:
    return urlsplit(line["path"]).path.rstrip("/").rsplit("/", 1)[-1]


def replayed(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line["response"]["mode"] == "ok"
        or (line["method"] == "OPTIONS" and line["response"]["mode"] == "preflight")
    ]


def request_fields(line: dict[str, Any]) -> dict[str, str]:
    """Parameters as the SDK sent them: query string, then a form body (not a JSON body)."""
    fields = {k: v[-1] for k, v in parse_qs(urlsplit(line["path"]).query).items()}
    body = base64.b64decode(line["body_b64"])
    if body and body.lstrip()[:1] not in (b"[", b"{"):
        fields.update({k: v[-1] for k, v in parse_qs(body.decode()).items()})
    return fields


def verbose_requested(line: dict[str, Any]) -> bool:
    value = request_fields(line).get("verbose", "").strip().lower()
    if value == "true":
        return True
    try:
        return float(value) >= 1
    except ValueError:
        return False


def decoded_records(line: dict[str, Any]) -> list[dict[str, Any]]:
    """The capture server's own decode of `data` (independent of Peoplebase's wire.py)."""
    decoded = line.get("decoded") or {}
    data = decoded.get("form_data") or decoded.get("query_data")
    assert data is not None, f"no decoded data in seq {line['seq']}"
    value = data["value"]
    return value if isinstance(value, list) else [value]


# --- an independent reference applier of SPEC §2-§5 ------------------------------------------


def typed_key(value: Any) -> Any:
    """JSON equality with types kept apart: 1 == 1.0, but 1, true and "1" differ."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("num", float(value))
    if isinstance(value, str):
        return ("str", value)
    if value is None:
        return ("null",)
    if isinstance(value, list):
        return ("list", tuple(typed_key(v) for v in value))
    return ("obj", tuple(sorted((k, typed_key(v)) for k, v in value.items())))


def cut(value: Any) -> Any:
    """String values ≤ 255 UTF-8 bytes, property names ≤ 255 characters (SPEC §6)."""
    if isinstance(value, str):
        return value.encode()[:255].decode("utf-8", "ignore")
    if isinstance(value, list):
        return [cut(v) for v in value]
    if isinstance(value, dict):
        return {k[:255]: cut(v) for k, v in value.items()}
    return value


def flag(value: Any) -> bool:
    return value is True or value == 1 or (isinstance(value, str) and value in ("true", "1"))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def last_seen(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(math.floor(t)))


def apply_record(props: dict[str, Any] | None, rec: dict[str, Any]) -> dict[str, Any] | None:
    if "$delete" in rec:
        return None
    ops = [op for op in ("$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset")]
    present = [op for op in ops if op in rec]
    if props is None:
        if all(op in ("$remove", "$unset") for op in present):
            return None
        props = {}
    else:
        props = dict(props)
    for op in present:
        value = rec[op]
        if op in ("$set", "$set_once"):
            for name, v in value.items():
                name = name[:255]
                if name in ("$ip", "$ignore_time"):
                    continue
                if op == "$set" or name not in props:
                    props[name] = cut(v)
        elif op == "$add":
            for name, v in value.items():
                current = props.get(name, 0)
                if is_number(v) and is_number(current):
                    props[name] = current + v
        elif op == "$union":
            for name, v in value.items():
                items = v if isinstance(v, list) else [v]
                existing = props.get(name, [])
                merged = list(existing) if isinstance(existing, list) else [existing]
                seen = {typed_key(x) for x in merged}
                for item in cut(items):
                    if typed_key(item) not in seen:
                        seen.add(typed_key(item))
                        merged.append(item)
                props[name] = merged
        elif op == "$append":
            for name, v in value.items():
                existing = props.get(name, [])
                merged = list(existing) if isinstance(existing, list) else [existing]
                props[name] = [*merged, cut(v)]
        elif op == "$remove":
            for name, v in value.items():
                if isinstance(props.get(name), list):
                    props[name] = [x for x in props[name] if typed_key(x) != typed_key(v)]
        elif op == "$unset":
            for name in [value] if isinstance(value, str) else value:
                props.pop(name[:255], None)
    return props


@dataclass
class Entry:
    time: float
    exact: bool  # time comes from an explicit $time, not a receipt time
    arrival: int
    record: dict[str, Any]


@dataclass
class RefProfile:
    entries: list[Entry] = field(default_factory=list)
    last_time: float = -math.inf
    last_exact: bool = False
    tomb: float | None = None
    seen: set[str] = field(default_factory=set)  # records with $time from earlier requests


class Reference:
    """SPEC §4 ordering (reorder window, tombstones, retries) over `apply_record`."""

    def __init__(self) -> None:
        self.profiles: dict[str, RefProfile] = {}
        self.arrivals = 0

    def request(self, records: list[dict[str, Any]], received: float) -> None:
        identities: list[tuple[RefProfile, str]] = []
        for rec in records:
            self.arrivals += 1
            prof = self.profiles.setdefault(str(rec["$distinct_id"]), RefProfile())
            raw_time = rec.get("$time")
            if raw_time is None:
                t, exact = received, False
            else:
                t, exact = float(raw_time), True
                if abs(t) >= 1e11:
                    t /= 1000.0
                clamped = t > received + SKEW
                if clamped:
                    t, exact = received, False
                identity = json.dumps(rec, sort_keys=True)
                if identity in prof.seen and (t <= prof.last_time or clamped):
                    continue  # a retry of a record accepted in an earlier request
                identities.append((prof, identity))
            if prof.tomb is not None and t <= prof.tomb:
                continue  # not later than a delete that arrived before it
            if prof.last_time != -math.inf and t < prof.last_time - WINDOW:
                t, exact = prof.last_time, prof.last_exact
            if "$delete" in rec:
                prof.entries = [e for e in prof.entries if e.time > t]
                prof.tomb = t
            else:
                prof.entries.append(Entry(t, exact, self.arrivals, rec))
            if t >= prof.last_time:
                prof.last_time, prof.last_exact = t, exact
        for prof, identity in identities:
            prof.seen.add(identity)

    def state(self, did: str) -> tuple[dict[str, Any] | None, bool]:
        """(properties, whether $last_seen is exact)."""
        prof = self.profiles.get(did)
        if prof is None:
            return None, True
        props: dict[str, Any] | None = None
        exact = True
        for entry in sorted(prof.entries, key=lambda e: (e.time, e.arrival)):
            props = apply_record(props, entry.record)
            if props is not None and not flag(entry.record.get("$ignore_time")):
                props["$last_seen"] = last_seen(entry.time)
                exact = entry.exact
        return props, exact

    def all_states(self) -> dict[str, tuple[dict[str, Any], bool]]:
        out = {}
        for did in self.profiles:
            props, exact = self.state(did)
            if props is not None:
                out[did] = (props, exact)
        return out


# --- replay ---------------------------------------------------------------------------------


@dataclass
class Replay:
    client: AppClient
    token: str
    started: float = field(default_factory=time.time)

    def stored(self, did: str) -> dict[str, Any] | None:
        store = self.client.app.store
        project = store.project_by_token(self.token)
        if project is None:
            return None
        rows = store.get_profiles(project.id, [did])
        return rows[0][1] if rows else None

    def stored_all(self) -> dict[str, dict[str, Any]]:
        store = self.client.app.store
        project = store.project_by_token(self.token)
        assert project is not None
        total, rows = store.list_profiles(project.id, 100_000, 0)
        assert total == len(rows)
        return dict(rows)

    def check_receipt_time(self, value: Any, where: str) -> None:
        assert isinstance(value, str) and LAST_SEEN_FORMAT.match(value), (where, value)
        assert last_seen(self.started) <= value <= last_seen(time.time()), (where, value)

    def compare(
        self,
        expected: dict[str, Any] | None,
        actual: dict[str, Any] | None,
        where: str,
        receipt: bool | None = None,
    ) -> None:
        """receipt: None = read the `<receipt>` marker of a golden file."""
        if expected is None or actual is None:
            assert actual == expected, where
            return
        expected = dict(expected)
        actual = dict(actual)
        want_seen = expected.pop("$last_seen", None)
        got_seen = actual.pop("$last_seen", None)
        assert actual == expected, where
        if receipt is None:
            receipt = want_seen == RECEIPT
        if receipt:
            self.check_receipt_time(got_seen, where)
        else:
            assert got_seen == want_seen, where


async def send(client: AppClient, line: dict[str, Any]) -> Any:
    headers = [(k, v) for k, v in line["headers"] if k.lower() not in DROP_HEADERS]
    body = base64.b64decode(line["body_b64"])
    return await client.http.request(
        line["method"], line["path"], headers=headers, content=body or None
    )


def check_response(line: dict[str, Any], r: Any) -> None:
    where = f"seq {line['seq']} {line['method']} {line['path'][:60]}"
    assert r.status_code == 200, (where, r.status_code, r.text)
    assert r.headers["x-content-type-options"] == "nosniff", where
    origin = dict((k.lower(), v) for k, v in line["headers"]).get("origin")
    if origin is not None:
        assert r.headers["access-control-allow-origin"] == origin, where
        assert r.headers["access-control-allow-credentials"] == "true", where
    if line["method"] == "OPTIONS":
        return
    route = route_of(line)
    status = 1 if route == "engage" else 0
    if verbose_requested(line):
        assert r.headers["content-type"] == "application/json", where
        body = r.json()
        assert body["status"] == status, (where, body)
        if status:
            assert body == {"status": 1, "error": None}, where
        else:
            assert isinstance(body["error"], str) and body["error"], where
    else:
        assert r.headers["content-type"].startswith("text/plain"), where
        assert r.text == str(status), (where, r.text)


async def replay_capture(client: AppClient, sdk: str) -> tuple[Replay, Reference]:
    golden = json.loads((GOLDEN / f"{sdk}.json").read_text())
    replay = Replay(client, golden["token"])
    reference = Reference()
    checkpoints = sorted(golden["checkpoints"], key=lambda c: c["after_seq"])
    lines = replayed(load_capture(sdk))
    assert lines, f"nothing to replay in {sdk}.jsonl"

    def due(seq: int) -> None:
        while checkpoints and checkpoints[0]["after_seq"] < seq:
            cp = checkpoints.pop(0)
            where = f"{sdk} after seq {cp['after_seq']}: {cp['distinct_id']}"
            actual = replay.stored(cp["distinct_id"])
            replay.compare(cp["properties"], actual, where)
            ref_props, ref_exact = reference.state(cp["distinct_id"])
            replay.compare(ref_props, actual, where + " (reference)", receipt=not ref_exact)

    for line in lines:
        due(line["seq"])
        received = time.time()
        r = await send(client, line)
        check_response(line, r)
        if line["method"] != "OPTIONS" and route_of(line) == "engage":
            reference.request(decoded_records(line), received)
    due(math.inf)  # type: ignore[arg-type]
    return replay, reference


@pytest.mark.parametrize("sdk", SDKS)
async def test_capture_replay(client: AppClient, sdk: str) -> None:
    replay, reference = await replay_capture(client, sdk)
    golden = json.loads((GOLDEN / f"{sdk}.json").read_text())
    stored = replay.stored_all()

    # hand-derived expectations
    assert len(stored) == golden["final_count"]
    for did, expected in golden["final"].items():
        replay.compare(expected, stored.get(did), f"{sdk} final {did}")

    # the independent reference, profile by profile
    expected_all = reference.all_states()
    assert sorted(stored) == sorted(expected_all)
    for did, (props, exact) in expected_all.items():
        replay.compare(props, stored[did], f"{sdk} reference {did}", receipt=not exact)


@pytest.mark.parametrize("sdk", SDKS)
def test_golden_files_agree_with_the_reference(sdk: str) -> None:
    """The hand-written expectations and the reference applier say the same thing."""
    golden = json.loads((GOLDEN / f"{sdk}.json").read_text())
    reference = Reference()
    checkpoints = sorted(golden["checkpoints"], key=lambda c: c["after_seq"])
    now = time.time()
    for line in replayed(load_capture(sdk)):
        while checkpoints and checkpoints[0]["after_seq"] < line["seq"]:
            cp = checkpoints.pop(0)
            props, _ = reference.state(cp["distinct_id"])
            assert strip_seen(props) == strip_seen(cp["properties"]), cp["after_seq"]
        if line["method"] != "OPTIONS" and route_of(line) == "engage":
            reference.request(decoded_records(line), now)
            now += 0.001
    states = reference.all_states()
    assert len(states) == golden["final_count"]
    for did, expected in golden["final"].items():
        got = states.get(did)
        assert strip_seen(got[0] if got else None) == strip_seen(expected), did


def strip_seen(props: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if props is None else {k: v for k, v in props.items() if k != "$last_seen"}


def test_captures_cover_the_request_forms() -> None:
    """Guard: the replay really exercises the forms SPEC §1 lists."""
    seen: set[str] = set()
    for sdk in SDKS:
        for line in replayed(load_capture(sdk)):
            headers = {k.lower(): v for k, v in line["headers"]}
            path = urlsplit(line["path"]).path
            if line["method"] == "OPTIONS":
                seen.add("preflight")
            elif route_of(line) != "engage":
                seen.add("event-or-group")
            elif line["method"] == "GET":
                seen.add("get")
            elif headers.get("content-type", "").startswith("text/plain"):
                seen.add("beacon")
            else:
                seen.add("form")
            if path.endswith("/"):
                seen.add("trailing-slash")
            if path.startswith("/mp/"):
                seen.add("prefix")
            if verbose_requested(line) and line["body_b64"] and "verbose" not in line["path"]:
                seen.add("verbose-in-body")
    assert seen == {
        "preflight",
        "event-or-group",
        "get",
        "beacon",
        "form",
        "trailing-slash",
        "prefix",
        "verbose-in-body",
    }
