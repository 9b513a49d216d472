-- Peoplebase schema, version 5 (SQLite): a profile's log has a bounded length.
--
-- log_n counts the entries of the profile's log (tail and chunks). Past max_log_entries the
-- oldest entries are folded into the base snapshot and log_floor records the $time of the cut:
-- an update older than it can no longer be put in its place (it is applied on top, like one
-- older than the reorder window).
ALTER TABLE profiles ADD COLUMN log_n INTEGER NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN log_floor REAL;

UPDATE profiles SET log_n = tail_n + coalesce((
    SELECT sum(json_array_length(CAST(c.entries AS TEXT))) FROM log_chunks c
    WHERE c.project_id = profiles.project_id AND c.distinct_id = profiles.distinct_id
), 0)
WHERE chunks > 0 OR tail_n > 0;
