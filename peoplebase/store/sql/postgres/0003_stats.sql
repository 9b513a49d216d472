-- Per-project counts of ingestion outcomes, by minute (the web page's overview charts).
-- Each Peoplebase process adds to its own rows (node), so writers on several nodes never wait
-- on each other for a counter row; readers sum over nodes.
CREATE TABLE stats (
    project_id bigint NOT NULL,
    minute     bigint NOT NULL,
    name       text NOT NULL,
    node       text NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (project_id, minute, name, node)
);
