-- Per-project counts of ingestion outcomes, by minute (the web page's overview charts).
CREATE TABLE stats (
    project_id INTEGER NOT NULL,
    minute     INTEGER NOT NULL,
    name       TEXT NOT NULL,
    count      INTEGER NOT NULL,
    PRIMARY KEY (project_id, minute, name)
) WITHOUT ROWID;
