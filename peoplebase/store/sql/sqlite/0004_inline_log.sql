-- Peoplebase schema, version 4 (SQLite): the update log moves into the profile row.
--
-- A profile's newest log entries live in its own row (tail: a JSON array of
-- [time, seq, received, dedup, {"o": ops, "i": 1, "g": geo}], tail_n entries), so the common
-- write touches one row instead of two B-trees. When the tail grows past a few entries it is
-- moved, as one row, to log_chunks (chunks counts them). The log of a profile is the union
-- of its chunks and its tail, in ($time, seq) order.
ALTER TABLE profiles ADD COLUMN tail BLOB;
ALTER TABLE profiles ADD COLUMN tail_n INTEGER NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN chunks INTEGER NOT NULL DEFAULT 0;

CREATE TABLE log_chunks (
    project_id  INTEGER NOT NULL,
    distinct_id TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,  -- the newest arrival among its entries: names the chunk
    entries     BLOB NOT NULL,
    PRIMARY KEY (project_id, distinct_id, last_seq)
) WITHOUT ROWID;

INSERT INTO log_chunks (project_id, distinct_id, last_seq, entries)
SELECT project_id, distinct_id, max(seq),
       CAST(json_group_array(json_array(time, seq, received, dedup, json(body)) ORDER BY time, seq) AS BLOB)
FROM updates
GROUP BY project_id, distinct_id;

UPDATE profiles SET chunks = 1
WHERE EXISTS (
    SELECT 1 FROM log_chunks c
    WHERE c.project_id = profiles.project_id AND c.distinct_id = profiles.distinct_id
);

DROP TABLE updates;
