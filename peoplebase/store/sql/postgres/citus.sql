-- How Peoplebase's tables are laid out on Citus. `peoplebase migrate` runs this file after the
-- migrations whenever the citus extension is installed in the database; it is idempotent.
--
-- Distributed, by distinct_id, all colocated: every table keyed by one profile. Citus hashes
-- a single column; the profile key is (project_id, distinct_id), and every statement of the
-- write path filters on both, so Citus routes it to the one shard that holds distinct_id.
-- Reference (copied to every node): small tables read on every request (projects, service
-- accounts). Others: stats by project_id; query sessions by session id.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['projects', 'service_accounts', 'service_account_projects'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t::regclass) THEN
            PERFORM create_reference_table(t);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'profiles'::regclass) THEN
        PERFORM create_distributed_table('profiles', 'distinct_id');
    END IF;
    FOREACH t IN ARRAY ARRAY['updates'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = t::regclass) THEN
            PERFORM create_distributed_table(t, 'distinct_id', colocate_with => 'profiles');
        END IF;
    END LOOP;
    -- outcome counters: each node adds to its own rows of one project
    IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'stats'::regclass) THEN
        PERFORM create_distributed_table('stats', 'project_id', colocate_with => 'none');
    END IF;
    -- query sessions: written and read by session id
    IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'query_sessions'::regclass) THEN
        PERFORM create_distributed_table('query_sessions', 'id', colocate_with => 'none');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'query_session_ids'::regclass) THEN
        PERFORM create_distributed_table('query_session_ids', 'session_id', colocate_with => 'query_sessions');
    END IF;
END
$$;
