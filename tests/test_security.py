"""Security (docs/security.md): rate limits, brute-force slowing, secrets at rest, CORS scope,
and a scan that no SQL is built by pasting values into the text.

JSONP callback validation and nosniff are tested in test_http_ingest.py (and nosniff on every
documented route in test_openapi.py); slow and hostile clients in test_hostile_input.py.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.ratelimit import TokenBuckets
from peoplebase.settings import Settings
from peoplebase.store.sqlite import SqliteStore
from tests.conftest import ROOT, AppClient

RATE_BODY = {
    "code": 429,
    "error": "Project exceeded rate limits. Please retry the request with exponential backoff.",
    "status": "Too Many Requests",
}


@pytest.fixture
async def make_client(tmp_path: Path) -> Any:
    made: list[tuple[PeoplebaseApp, AppClient]] = []

    def make(**changes: Any) -> AppClient:
        app = PeoplebaseApp(
            Settings(db=str(tmp_path / f"s{len(made)}.db"), tokens="open", **changes)
        )
        app.startup()
        client = AppClient(app)
        made.append((app, client))
        return client

    yield make
    for app, client in made:
        await client.http.aclose()
        app.shutdown()


def records(token: str, n: int, did: str = "u") -> list[dict[str, Any]]:
    return [{"$token": token, "$distinct_id": did, "$add": {"n": 1}} for _ in range(n)]


async def stored_n(client: AppClient, token: str, did: str = "u") -> int | None:
    r = await client.http.post(
        "/api/query/engage", data={"distinct_id": did}, headers=client.auth(token)
    )
    results = r.json()["results"]
    return results[0]["$properties"].get("n") if results else None


# --- per-token ingestion rate limit -----------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after_and_cors(make_client: Any) -> None:
    client = make_client(rate_limit=2.0, rate_burst=10)
    ok = await client.http.post("/engage", json=records("limited", 10))
    assert (ok.status_code, ok.text) == (200, "1")
    over = await client.http.post(
        "/engage", json=records("limited", 3), headers={"origin": "https://shop.example"}
    )
    assert over.status_code == 429
    assert over.json() == RATE_BODY
    assert 1 <= int(over.headers["retry-after"]) <= 2  # 3 records at 2 per second
    assert over.headers["access-control-allow-origin"] == "https://shop.example"
    assert over.headers["access-control-allow-credentials"] == "true"
    assert over.headers["x-content-type-options"] == "nosniff"
    # Another token has its own bucket; nothing of the refused request was applied.
    other = await client.http.post("/engage", json=records("other", 5))
    assert (other.status_code, other.text) == (200, "1")
    assert await stored_n(client, "limited") == 10


async def test_rate_limit_off_by_default(make_client: Any) -> None:
    client = make_client()
    assert client.app.settings.rate_limit == 0
    for _ in range(5):
        r = await client.http.post("/engage", json=records("free", 2000))
        assert (r.status_code, r.text) == (200, "1")


async def test_default_burst_takes_one_full_request(make_client: Any) -> None:
    client = make_client(rate_limit=1.0)
    first = await client.http.post("/engage", json=records("burst", 2000))
    assert first.status_code == 200
    second = await client.http.post("/engage", json=records("burst", 1))
    assert second.status_code == 429


def test_token_bucket_refills_and_takes_big_requests_when_full() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=10.0, burst=20.0, clock=lambda: now[0])
    assert buckets.take("t", 20) == 0.0
    assert buckets.take("t", 5) == pytest.approx(0.5)
    now[0] = 0.5
    assert buckets.take("t", 5) == 0.0
    now[0] = 10.0  # full again: a take larger than the burst is allowed once, into debt
    assert buckets.take("t", 50) == 0.0
    assert buckets.take("t", 1) == pytest.approx((1 + 30) / 10.0)
    assert TokenBuckets(rate=0, burst=1).take("t", 10**9) == 0.0


def test_token_buckets_bound_their_memory() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1.0, burst=5.0, clock=lambda: now[0], max_keys=100)
    for i in range(1000):
        buckets.take(f"k{i}", 1)
        now[0] += 0.001
    assert len(buckets._buckets) <= 100


# --- failed authentication is slowed per client address ----------------------------------------


async def test_query_api_failed_auth_limit(make_client: Any) -> None:
    client = make_client(auth_fail_limit=3)
    good = client.auth("locked")
    bad = {"Authorization": "Basic d3Jvbmc6"}  # "wrong:"
    for _ in range(3):
        r = await client.http.post("/api/query/engage", headers=bad)
        assert r.status_code == 401
    r = await client.http.post("/api/query/engage", headers=good)
    assert r.status_code == 429  # even the right secret waits: nothing is checked
    assert r.json()["error"] == "too many failed authentications from this address; retry later"
    assert 1 <= int(r.headers["retry-after"]) <= 20
    # Another address is not affected.
    transport = httpx.ASGITransport(app=client.app, client=("198.51.100.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as elsewhere:
        r = await elsewhere.post("/api/query/engage", headers=good)
        assert r.status_code == 200


async def test_successes_do_not_count_as_failures(make_client: Any) -> None:
    client = make_client(auth_fail_limit=2)
    good = client.auth("fine")
    for _ in range(10):
        assert (await client.http.post("/api/query/engage", headers=good)).status_code == 200


async def test_web_sign_in_failed_auth_limit(make_client: Any) -> None:
    client = make_client(auth_fail_limit=2)
    secret = client.secret_for("web")

    async def sign_in(value: str) -> httpx.Response:
        page = await client.http.get("/ui/login")
        match = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert match is not None
        return await client.http.post("/ui/login", data={"secret": value, "csrf": match.group(1)})

    assert (await sign_in("nope")).status_code == 401
    assert (await sign_in("nope")).status_code == 401
    blocked = await sign_in(secret)
    assert blocked.status_code == 429
    assert "Too many failed sign-ins" in blocked.text
    assert int(blocked.headers["retry-after"]) >= 1


# --- secrets at rest --------------------------------------------------------------------------


def test_secrets_are_stored_hashed(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "h.db"))
    store.open()
    _, secret = store.create_project("hashed")
    _, rotated = store.rotate_secret("hashed")
    store.close()  # everything on disk, WAL checkpointed
    assert re.fullmatch(r"[0-9a-f]{32}", rotated) and rotated != secret
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.db*"))
    assert rotated.encode() not in raw and secret.encode() not in raw
    assert hashlib.sha256(rotated.encode()).hexdigest().encode() in raw


# --- CORS only on ingestion (SPEC §7) ---------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/ui/login"),
        ("GET", "/ui/"),
        ("POST", "/api/query/engage"),
        ("POST", "/api/query/export"),
        ("GET", "/nowhere"),
    ],
)
async def test_no_cors_outside_ingestion(client: AppClient, method: str, path: str) -> None:
    r = await client.http.request(method, path, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["x-content-type-options"] == "nosniff"


# --- no SQL built by pasting ------------------------------------------------------------------

MARK = "sql: reviewed"
EXECUTE = {"execute", "executemany", "executescript"}
SCANNED = ("peoplebase", "benchmarks")


class SqlPasteScanner:
    """Finds execute() calls whose SQL text is built from non-constants: f-strings with
    fields, `%` or `+` with anything but constants, str.format, str.join, or a local name
    assigned one of those. psycopg's sql.SQL(...).format(...) composes safely and passes.
    A finding is accepted when the statement (or the line above it, or the assignment that
    built the text) carries `# sql: reviewed: <why>` or ruff's `# noqa: S608` exemption."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.lines = source.splitlines()
        self.module = self._assignments(self.tree, top_only=True)

    @staticmethod
    def _assignments(scope: ast.AST, top_only: bool = False) -> dict[str, list[ast.expr]]:
        out: dict[str, list[ast.expr]] = {}
        nodes = scope.body if top_only else ast.walk(scope)  # type: ignore[attr-defined]
        for node in nodes:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        out.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.value is not None:
                    out.setdefault(node.target.id, []).append(node.value)
        return out

    def _constant(
        self, node: ast.expr, local: dict[str, list[ast.expr]], seen: frozenset[str]
    ) -> bool:
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.Name) and node.id not in seen:
            values = local.get(node.id) or self.module.get(node.id)
            return bool(values) and all(self._constant(v, local, seen | {node.id}) for v in values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._constant(node.left, local, seen) and self._constant(
                node.right, local, seen
            )
        if isinstance(node, ast.IfExp):
            return self._constant(node.body, local, seen) and self._constant(
                node.orelse, local, seen
            )
        return False

    def _pasted(self, node: ast.expr, local: dict[str, list[ast.expr]]) -> ast.expr | None:
        """The expression that pastes text into the SQL, if any."""
        if isinstance(node, ast.JoinedStr):
            return node if any(isinstance(v, ast.FormattedValue) for v in node.values) else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
            return None if self._constant(node, local, frozenset()) else node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "format":
                base = node.func.value
                composed = isinstance(base, ast.Call) and "SQL" in (
                    getattr(base.func, "attr", None),
                    getattr(base.func, "id", None),
                )
                return None if composed else node
            if node.func.attr == "join":
                return node
        if isinstance(node, ast.Name):
            for value in local.get(node.id, []):
                if self._pasted(value, local) is not None and not self._reviewed(value):
                    return value
        return None

    def _reviewed(self, node: ast.AST) -> bool:
        first = getattr(node, "lineno", 1)
        last = getattr(node, "end_lineno", None) or first
        text = "\n".join(self.lines[max(first - 2, 0) : last])
        return MARK in text or "noqa: S608" in text

    def findings(self) -> list[int]:
        out = set()
        scopes: list[ast.AST] = [self.tree]
        scopes += [
            n for n in ast.walk(self.tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for scope in scopes:
            local = self._assignments(scope) if scope is not self.tree else {}
            for node in ast.walk(scope):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in EXECUTE
                    and node.args
                ):
                    continue
                culprit = self._pasted(node.args[0], local)
                if culprit is not None and not (self._reviewed(node) or self._reviewed(culprit)):
                    out.add(node.lineno)
        return sorted(out)


def test_no_sql_is_built_by_pasting() -> None:
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            scanner = SqlPasteScanner(path.read_text())
            for line in scanner.findings():
                found.append(f"{path.relative_to(ROOT)}:{line}: {scanner.lines[line - 1].strip()}")
    assert not found, (
        "SQL built by pasting (bind the values, or mark `# sql: reviewed: why`):\n"
        + "\n".join(found)
    )


@pytest.mark.parametrize(
    "code",
    [
        'conn.execute(f"SELECT * FROM t WHERE a = {a}")',
        'conn.execute("SELECT * FROM t WHERE a = %s" % a)',
        'conn.execute("SELECT * FROM t WHERE a = " + a)',
        'conn.execute("SELECT * FROM t WHERE a = {}".format(a))',
        'conn.executemany(" ".join(parts), rows)',
        'def f(a):\n    sql = "SELECT " + a\n    return conn.execute(sql)',
    ],
)
def test_the_scanner_flags_pasting(code: str) -> None:
    assert SqlPasteScanner(code).findings()


@pytest.mark.parametrize(
    "code",
    [
        'conn.execute("SELECT * FROM t WHERE a = ?", (a,))',
        'Q = "SELECT 1"\nconn.execute(Q + " FROM t")',
        'conn.execute(sql.SQL("SELECT {}").format(sql.Identifier(a)))',
        'conn.execute(f"PRAGMA x = {int(n)}")  # sql: reviewed: an int',
    ],
)
def test_the_scanner_passes_constants_and_reviewed_lines(code: str) -> None:
    assert SqlPasteScanner(code).findings() == []
