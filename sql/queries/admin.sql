-- Queries of the operations tools: kojin-pg stats/queues/bindings and the Prometheus collector.
-- One query per group of figures, so a scrape costs a fixed handful of statements.

-- name: queue_overview
-- Every queue that holds messages or dead letters or is only bound (declared, empty): ready,
-- leased, scheduled (not yet visible, not leased) and dead counts, the age of the oldest ready
-- message, the number of bindings, and in how many seconds the next scheduled one is due.
WITH m AS (
    SELECT queue,
           count(*) FILTER (WHERE visible_at <= now()) AS ready,
           count(*) FILTER (WHERE visible_at > now() AND leased_by IS NOT NULL) AS leased,
           count(*) FILTER (WHERE visible_at > now() AND leased_by IS NULL) AS scheduled,
           extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE visible_at <= now()))::float8
               AS oldest_ready_age,
           extract(epoch FROM min(due_at) FILTER (WHERE due_at > now()) - now())::float8
               AS next_due
    FROM {schema}.messages GROUP BY queue
), d AS (
    SELECT queue, count(*) AS dead FROM {schema}.dead_letters GROUP BY queue
), b AS (
    SELECT queue, count(*) AS bindings FROM {schema}.bindings GROUP BY queue
)
SELECT q.queue, coalesce(m.ready, 0), coalesce(m.leased, 0), coalesce(m.scheduled, 0),
       coalesce(d.dead, 0), m.oldest_ready_age, coalesce(b.bindings, 0), m.next_due
FROM (SELECT queue FROM m UNION SELECT queue FROM d UNION SELECT queue FROM b) q
LEFT JOIN m USING (queue) LEFT JOIN d USING (queue) LEFT JOIN b USING (queue)
ORDER BY q.queue;

-- name: result_stats
-- Rows, expired-but-not-yet-deleted rows, and size of the results table.
SELECT count(*),
       count(*) FILTER (WHERE expires_at <= now()),
       (SELECT pg_total_relation_size(c.oid) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relname = 'results')
FROM {schema}.results;

-- name: table_health
-- Per kojin table: estimated live and dead tuples, last (auto)vacuum, size, and the cumulative
-- rows inserted and deleted since the statistics were last reset (counters for rates).
SELECT relname, n_live_tup, n_dead_tup, greatest(last_vacuum, last_autovacuum),
       pg_total_relation_size(relid), n_tup_ins, n_tup_del
FROM pg_stat_user_tables WHERE schemaname = %(schema)s ORDER BY relname;

-- name: server_health
-- NOTIFY queue usage (0..1; at 1 every NOTIFY fails) and the oldest transaction of this database
-- that holds back vacuum (age in seconds, pid, application_name, state), if any.
SELECT pg_notification_queue_usage(), o.age, o.pid, o.application_name, o.state
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT extract(epoch FROM now() - xact_start)::float8 AS age, pid, application_name, state
    FROM pg_stat_activity
    WHERE datname = current_database() AND xact_start IS NOT NULL
      AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL) AND pid <> pg_backend_pid()
    ORDER BY xact_start LIMIT 1
) o ON true;

-- name: last_minute
-- Work done in the last minute: results stored as finished, messages dead-lettered.
SELECT (SELECT count(*) FROM {schema}.results WHERE date_done > now() - interval '1 minute'),
       (SELECT count(*) FROM {schema}.dead_letters WHERE dead_at > now() - interval '1 minute');

-- name: binding_list
-- Every binding with its queue's figures: leased messages, ready messages never delivered and
-- the age of the oldest of them, and the binding's age in seconds.
WITH m AS (
    SELECT queue,
           count(*) FILTER (WHERE visible_at > now() AND leased_by IS NOT NULL) AS leased,
           count(*) FILTER (WHERE visible_at <= now() AND delivery_count = 0) AS undelivered,
           extract(epoch FROM now() - min(enqueued_at)
               FILTER (WHERE visible_at <= now() AND delivery_count = 0))::float8
               AS oldest_undelivered_age
    FROM {schema}.messages GROUP BY queue
)
SELECT b.exchange, b.routing_key, b.queue, extract(epoch FROM now() - b.created_at)::float8,
       coalesce(m.leased, 0), coalesce(m.undelivered, 0), m.oldest_undelivered_age
FROM {schema}.bindings b LEFT JOIN m USING (queue)
ORDER BY b.queue, b.exchange, b.routing_key;

-- name: prune_unused_queue
-- Delete a queue (messages and bindings) only if it is still unused: no leased message, a ready
-- message never delivered for longer than %(age)s seconds, every binding older than that.
-- Returns the number of bindings removed (0 when the queue turned out to be in use).
WITH unused AS (
    SELECT 1 WHERE
        NOT EXISTS (SELECT 1 FROM {schema}.messages WHERE queue = %(queue)s
                    AND visible_at > now() AND leased_by IS NOT NULL)
        AND EXISTS (SELECT 1 FROM {schema}.messages WHERE queue = %(queue)s
                    AND visible_at <= now() AND delivery_count = 0
                    AND enqueued_at < now() - make_interval(secs => %(age)s))
        AND NOT EXISTS (SELECT 1 FROM {schema}.bindings WHERE queue = %(queue)s
                        AND created_at >= now() - make_interval(secs => %(age)s))
), gone_messages AS (
    DELETE FROM {schema}.messages WHERE queue = %(queue)s AND EXISTS (SELECT 1 FROM unused)
), gone_bindings AS (
    DELETE FROM {schema}.bindings WHERE queue = %(queue)s AND EXISTS (SELECT 1 FROM unused)
    RETURNING 1
)
SELECT count(*) FROM gone_bindings;

-- name: dlq_max_id
-- The newest dead letter now: batched requeue/purge stop there, so a message dead-lettered
-- again while the command runs is not requeued a second time.
SELECT coalesce(max(id), 0) FROM {schema}.dead_letters;

-- name: dlq_take_batch
-- Take up to %(batch)s selected dead letters out of the table; with %(requeue)s put them back
-- in their queues with a fresh delivery count (one NOTIFY per queue), else they are purged.
-- Returns how many were taken.
WITH picked AS (
    SELECT id FROM {schema}.dead_letters
    WHERE id <= %(upto)s
      AND (%(all)s OR id = ANY(%(ids)s::bigint[]) OR queue = %(queue)s::text)
    ORDER BY id LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), taken AS (
    DELETE FROM {schema}.dead_letters d USING picked p WHERE d.id = p.id
    RETURNING d.id, d.queue, d.priority, d.payload
), sent AS (
    INSERT INTO {schema}.messages (queue, priority, payload)
    SELECT queue, priority, payload FROM taken WHERE %(requeue)s ORDER BY id
    RETURNING queue
)
SELECT (SELECT count(*) FROM taken),
       (SELECT count(pg_notify(%(channel)s, queue)) FROM (SELECT DISTINCT queue FROM sent) q);
