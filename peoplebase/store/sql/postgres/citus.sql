-- How Peoplebase's tables are laid out on Citus. `peoplebase migrate` runs this file after the
-- migrations whenever the citus extension is installed in the database; it is idempotent.
--
-- Profile tables (profiles, updates): distributed by distinct_id and colocated. The profile
-- key is (project_id, distinct_id); Citus hashes a single column, and every statement of the
-- write path filters on both columns, so each is routed to the one shard holding distinct_id.
-- Reference tables (copied to every node, read on every request): projects, service accounts.
-- Others: stats by project_id (each node adds to its own rows); query sessions by session id.
DO $$
BEGIN
    IF to_regclass('projects') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_reference_table('projects');
    END IF;
    IF to_regclass('service_accounts') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_reference_table('service_accounts');
    END IF;
    IF to_regclass('service_account_projects') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_reference_table('service_account_projects');
    END IF;
    IF to_regclass('profiles') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_distributed_table('profiles', 'distinct_id');
    END IF;
    IF to_regclass('updates') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_distributed_table('updates', 'distinct_id', colocate_with => 'profiles');
    END IF;
    IF to_regclass('stats') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_distributed_table('stats', 'project_id', colocate_with => 'none');
    END IF;
    IF to_regclass('query_sessions') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_distributed_table('query_sessions', 'id', colocate_with => 'none');
    END IF;
    IF to_regclass('query_session_ids') NOT IN (SELECT logicalrelid FROM pg_dist_partition) THEN
        PERFORM create_distributed_table('query_session_ids', 'session_id', colocate_with => 'query_sessions');
    END IF;
END
$$;
