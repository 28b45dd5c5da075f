-- Queries of the operations CLI (kojin-pg stats).

-- name: result_stats
-- Rows, expired-but-not-yet-deleted rows, and size of the results table.
SELECT count(*),
       count(*) FILTER (WHERE expires_at <= now()),
       pg_total_relation_size(%(table)s::regclass)
FROM {schema}.results;

-- name: table_health
-- Live and dead tuples and last (auto)vacuum of each kojin table.
SELECT relname, n_live_tup, n_dead_tup, greatest(last_vacuum, last_autovacuum),
       pg_total_relation_size(relid)
FROM pg_stat_user_tables WHERE schemaname = %(schema)s ORDER BY relname;

-- name: oldest_xmin
-- Age of the oldest transaction snapshot holding back vacuum, and who holds it.
SELECT extract(epoch FROM now() - xact_start)::float8, pid, application_name, state
FROM pg_stat_activity
WHERE backend_xmin IS NOT NULL AND xact_start IS NOT NULL AND pid <> pg_backend_pid()
ORDER BY xact_start LIMIT 1;

-- name: last_minute
-- Work done in the last minute: results stored as finished, messages dead-lettered.
SELECT (SELECT count(*) FROM {schema}.results WHERE date_done > now() - interval '1 minute'),
       (SELECT count(*) FROM {schema}.dead_letters WHERE dead_at > now() - interval '1 minute');
