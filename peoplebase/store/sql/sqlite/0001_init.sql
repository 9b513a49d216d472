-- Peoplebase schema, version 1 (SQLite).
CREATE TABLE projects (
    id          INTEGER PRIMARY KEY,
    token       TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL DEFAULT '',
    secret_hash TEXT NOT NULL,
    created_at  REAL NOT NULL
);

-- One row per profile ever touched. props IS NULL: the profile does not exist (never
-- created, or deleted: tomb holds the time of the newest $delete).
CREATE TABLE profiles (
    project_id  INTEGER NOT NULL,
    distinct_id TEXT NOT NULL,
    props       TEXT,
    last_time   REAL NOT NULL,
    base        TEXT,
    tomb        REAL,
    log_min     REAL,
    PRIMARY KEY (project_id, distinct_id)
) WITHOUT ROWID;

-- The per-profile update log within the reorder window, in ($time, arrival) order.
CREATE TABLE updates (
    project_id  INTEGER NOT NULL,
    distinct_id TEXT NOT NULL,
    time        REAL NOT NULL,
    seq         INTEGER NOT NULL,
    received    REAL NOT NULL,
    dedup       INTEGER,
    body        TEXT NOT NULL,
    PRIMARY KEY (project_id, distinct_id, time, seq)
) WITHOUT ROWID;

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('seq', 0);
