"""Every tunable of Peoplebase, in one table.

Each `Setting` becomes a `peoplebase serve` flag (`--reorder-window`), a `PEOPLEBASE_*`
environment variable (`PEOPLEBASE_REORDER_WINDOW`) and a row in `docs/settings.md`; a test
checks that the three agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PEOPLEBASE_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", "Address to listen on."),
    Setting("port", 8000, "TCP port to listen on."),
    Setting(
        "db",
        "./peoplebase.db",
        "Database: a SQLite file path, or a postgresql:// URL (see docs/deploying.md).",
    ),
    Setting(
        "tokens",
        "auto",
        "Unknown project tokens: 'open' creates the project on first sight, 'closed' rejects "
        "the record. 'auto' means open on a loopback address, closed otherwise.",
        ("auto", "open", "closed"),
    ),
    Setting(
        "synchronous",
        "full",
        "Durability. SQLite: 'full' fsyncs every commit before answering (a 200 survives "
        "power loss); 'normal' may lose the last commits on power loss (not on a process "
        "crash). PostgreSQL: 'full' keeps the server's synchronous_commit; 'normal' sets "
        "synchronous_commit = off (a database-server crash may lose the last commits).",
        ("full", "normal"),
    ),
    Setting(
        "reorder_window",
        7 * 86400.0,
        "Seconds of $time within which late updates are re-ordered into place; older ones "
        "are applied on top and counted.",
    ),
    Setting(
        "max_log_entries",
        0,
        "Entries a profile's update log may keep (0: no limit). Past it the oldest are folded "
        "into the profile's snapshot, and updates older than the cut lose the ordering and "
        "retry guarantees: they are applied on top like those beyond the reorder window. "
        "Bounds the work one late update causes on a very busy profile.",
    ),
    Setting(
        "log_cache",
        100_000,
        "SQLite: decoded update-log entries the writer keeps in memory between group commits "
        "(0: off): the logs of 16 entries or more it had to read (late updates, possible "
        "retries, deletes), kept with the profiles it holds (held_profiles), so the next late "
        "update of such a profile reads and parses nothing from the file. One log is kept only "
        "if it fits in a quarter of this; the least recently used go first. Not used with "
        "PostgreSQL.",
    ),
    Setting(
        "write_behind",
        1.0,
        "SQLite: seconds within which the profile row of an acknowledged update is written. A "
        "group commit makes its updates durable in the journal (one appended row) and writes "
        "the changed profiles' rows later, in key order, a part with every group, so a busy "
        "profile's row is written about once per interval however many updates it gets; "
        "reads see every acknowledged update meanwhile. 0 writes every changed row in the "
        "commit that acknowledges it. Not used with PostgreSQL.",
    ),
    Setting(
        "held_profiles",
        100_000,
        "SQLite: profiles the writer keeps in memory between group commits (those changed "
        "and not yet written, then the most recently used); past it, rows are written sooner "
        "and the least recently used written ones are dropped.",
    ),
    Setting(
        "time_skew", 60.0, "Seconds a $time may lie in the future before it is clamped to now."
    ),
    Setting("max_records", 2000, "Records per ingestion request; more is rejected with 400."),
    Setting("max_body_bytes", 10 * 1024 * 1024, "Request body limit, after decompression (413)."),
    Setting(
        "max_record_bytes", 1_000_000, "Size limit of one update record (the record is invalid)."
    ),
    Setting("max_properties", 2000, "Properties per profile; additions beyond it are skipped."),
    Setting(
        "queue_records",
        200_000,
        "Records waiting for the writer; past it, ingestion answers 503 with Retry-After.",
    ),
    Setting(
        "queue_wait",
        2.0,
        "Seconds a request may expect to wait in the write queue (queued records at the recent "
        "commit speed); past it, ingestion answers 503 with Retry-After. 0 turns it off.",
    ),
    Setting("group_records", 20_000, "Most records one group commit takes from the queue."),
    Setting(
        "writer",
        "process",
        "Where merges and commits run: 'process' (a child process with a core of its own; "
        "parsing and commits overlap) or 'thread' (a thread of the server process).",
        ("thread", "process"),
    ),
    Setting("retry_after", 1, "Seconds sent in Retry-After when overloaded or storage fails."),
    Setting(
        "rate_limit",
        0.0,
        "Ingestion rate limit: records per second per project token (0: no limit). Past it, "
        "ingestion answers 429 with Retry-After and applies nothing.",
    ),
    Setting(
        "rate_burst",
        0,
        "Records a token may send at once above rate_limit (0: ten seconds' worth, at least "
        "max_records).",
    ),
    Setting(
        "request_timeout",
        60.0,
        "Seconds a client has to send a whole request (headers and body) once it connects or "
        "starts one; slower connections are closed and nothing of the request applied (0: none).",
    ),
    Setting(
        "auth_fail_limit",
        10,
        "Failed authentications per minute per client address on the query API and the web "
        "sign-in; past it they answer 429 with Retry-After (0: no limit).",
    ),
    Setting("page_size", 1000, "Profiles per page of /api/query/engage."),
    Setting("max_distinct_ids", 2000, "Most distinct_ids one query may name."),
    Setting(
        "query_session_ttl",
        600.0,
        "Seconds a /api/query/engage session (its frozen list of matches) stays usable; "
        "later pages of an older session answer 400 and page 0 must be requested again.",
    ),
    Setting(
        "query_timeout",
        30.0,
        "Seconds one query (or one export batch) may run before it is stopped (400); 0 for no "
        "limit.",
    ),
    Setting(
        "query_concurrency",
        5,
        "Queries and exports one project may run at the same time; more answer 429 with "
        "Retry-After.",
    ),
    Setting(
        "indexed_properties",
        "$email,$name",
        'Comma-separated property names whose equality filters (properties["x"] == "v") '
        "and the web page's search are answered from an index; each index costs a little on "
        "every write. Give every node sharing a database the same list.",
    ),
    Setting("log_level", "info", "Log level.", ("debug", "info", "warning", "error")),
    Setting(
        "session_key",
        "",
        "Key that signs the web page's session cookies. Empty: a random key per process (sessions "
        "end on restart). Set the same value on every node behind one load balancer.",
    ),
    Setting(
        "geoip_db",
        "",
        "Geolocation database: the path of a MaxMind-format .mmdb file (GeoLite2-City, "
        "DB-IP City Lite, ...) for city-level $city/$region/$country_code/$timezone; empty "
        "for the embedded country-level data ($country_code only); 'off' for none. The file "
        "is re-read when replaced on disk or on SIGHUP. See docs/geolocation.md.",
    ),
    Setting(
        "trusted_proxies",
        "",
        "Comma-separated addresses or CIDR networks of reverse proxies whose X-Forwarded-For "
        "or Forwarded header gives the client address (e.g. 127.0.0.1,10.0.0.0/8). Empty: "
        "the socket peer is the client and those headers are ignored.",
    ),
)

BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "./peoplebase.db"
    tokens: str = "auto"
    synchronous: str = "full"
    reorder_window: float = 7 * 86400.0
    max_log_entries: int = 0
    log_cache: int = 100_000
    write_behind: float = 1.0
    held_profiles: int = 100_000
    time_skew: float = 60.0
    max_records: int = 2000
    max_body_bytes: int = 10 * 1024 * 1024
    max_record_bytes: int = 1_000_000
    max_properties: int = 2000
    queue_records: int = 200_000
    queue_wait: float = 2.0
    group_records: int = 20_000
    writer: str = "process"
    retry_after: int = 1
    rate_limit: float = 0.0
    rate_burst: int = 0
    request_timeout: float = 60.0
    auth_fail_limit: int = 10
    page_size: int = 1000
    max_distinct_ids: int = 2000
    query_session_ttl: float = 600.0
    query_timeout: float = 30.0
    query_concurrency: int = 5
    indexed_properties: str = "$email,$name"
    log_level: str = "info"
    session_key: str = ""
    geoip_db: str = ""
    trusted_proxies: str = ""

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def tokens_open(self) -> bool:
        if self.tokens == "auto":
            return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        return self.tokens == "open"


def _check_table() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    table = {s.name: s.default for s in SETTINGS}
    assert fields == table, "Settings dataclass and SETTINGS table disagree"


_check_table()
