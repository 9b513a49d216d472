-- Peoplebase schema, version 4 (PostgreSQL): a profile's log has a bounded length.
--
-- log_n counts the profile's rows in `updates`. Past max_log_entries the oldest entries are
-- folded into the base snapshot and log_floor records the $time of the cut: an update older
-- than it can no longer be put in its place (it is applied on top, like one older than the
-- reorder window).
ALTER TABLE profiles ADD COLUMN log_n integer NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN log_floor double precision;

UPDATE profiles p SET log_n = u.n
FROM (
    SELECT project_id, distinct_id, count(*) AS n FROM updates GROUP BY project_id, distinct_id
) u
WHERE p.project_id = u.project_id AND p.distinct_id = u.distinct_id;
