-- Peoplebase schema, version 2 (SQLite): query sessions and service accounts.

-- A query session freezes, at page 0, the distinct_ids matching a query (in distinct_id
-- order); later pages read profiles by position. Rows expire with their session.
CREATE TABLE query_sessions (
    id          TEXT PRIMARY KEY,
    project_id  INTEGER NOT NULL,
    total       INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX query_sessions_expiry ON query_sessions (expires_at);

CREATE TABLE query_session_ids (
    session_id  TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    distinct_id TEXT NOT NULL,
    PRIMARY KEY (session_id, pos)
) WITHOUT ROWID;

-- Service accounts: user name + secret (stored hashed), scoped to projects.
CREATE TABLE service_accounts (
    id          INTEGER PRIMARY KEY,
    username    TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL DEFAULT '',
    secret_hash TEXT NOT NULL,
    created_at  REAL NOT NULL
);

CREATE TABLE service_account_projects (
    account_id  INTEGER NOT NULL,
    project_id  INTEGER NOT NULL,
    PRIMARY KEY (account_id, project_id)
) WITHOUT ROWID;
