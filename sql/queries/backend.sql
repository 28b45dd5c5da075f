-- Queries of the result backend. Each starts with "-- name: <name>" and a line saying what it
-- does; {schema} (and {table} where named) are replaced with quoted identifiers, values are
-- always bound parameters.

-- name: store_result
-- Insert or update one result and wake its waiters (the procedure of sql/0012), announcing the
-- result itself when the caller passes it (announce), else the task id; returns whether it
-- announced. Only if a waiter can exist (see kojin_pg/backend/waiters.py): a shared lock on the
-- task's writing key, held until the result's commit, then a probe of its wait slot (an
-- exclusive try, given back at once): it fails while a waiter holds the slot. A waiter taking
-- the slot after the probe waits for that commit (its barrier on the writing key), then reads
-- the result. If the slot is free, the same for the sender key of the thread that sent the
-- task (sender_key, from its reply_to; NULL: none named). With commit_first (not inside a
-- transaction), a result it announces commits with its announcement without waiting for the
-- WAL flush, then a second transaction waits for the flush (sql/0013), so that no commit holds
-- the database's NOTIFY lock across a flush and the waiter reads the result while the flush
-- is under way. It returns once the result is durable. A stored SUCCESS is never overwritten.
CALL {schema}.store_result(
    %(task_id)s::text, %(status)s::text, %(result)s::jsonb, %(result_bytes)s::bytea,
    %(traceback)s::text, %(children)s::jsonb, %(group_id)s::text, %(parent_id)s::text,
    %(name)s::text, %(args)s::jsonb, %(kwargs)s::jsonb, %(worker)s::text, %(retries)s::int,
    %(queue)s::text, %(date_done)s::timestamptz, %(expires)s::float8, %(notify)s::boolean,
    %(channel)s::text, %(announce)s::text, %(wait_space)s::int, %(writing_space)s::int,
    %(wait_slot)s::int, %(sender_key)s::int, %(commit_first)s::boolean);

-- name: wait_slots
-- A waiting process takes (shared, for its session) the wait slots of the tasks it starts
-- waiting for, each followed by a barrier that waits for the stores in flight on that slot to
-- commit (the exclusive writing lock, taken and given back at once), and gives back the slots
-- of the tasks it no longer waits for.
SELECT (SELECT count(pg_advisory_unlock_shared(%(wait_space)s, slot))
        FROM unnest(%(release)s::int[]) AS slot),
       (SELECT count(pg_advisory_lock_shared(%(wait_space)s, slot))
               + count(pg_advisory_lock(%(writing_space)s, slot))
               + count(pg_advisory_unlock(%(writing_space)s, slot))
        FROM unnest(%(take)s::int[]) AS slot);

-- name: wait_and_read
-- Take and give back wait slots, then read one unexpired result (after the slots are taken
-- and the stores in flight on them committed); with it, read ahead (see
-- kojin_pg/backend/readahead.py) the unexpired results of the tasks in ahead that are final
-- and small (the columns that a read returns stored uncompressed in at most max_bytes). The
-- results ahead are looked up one by one by their key: as one scan, the planner may take every
-- finished result through the status index when its statistics are stale (a table that grew
-- since it was last analyzed), and the read then costs what the table holds. LIMIT 1 (the key
-- is unique) keeps the lookup from being merged into such a scan.
SELECT task_id, status, result, result_bytes, traceback, children, group_id, parent_id,
       name, args, kwargs, worker, retries, queue, date_done
FROM {schema}.take_wait_slots_and_read(%(wait_space)s, %(writing_space)s, %(take)s::int[],
                                       %(release)s::int[], %(task_id)s)
UNION ALL
SELECT r.task_id, r.status, r.result, r.result_bytes, r.traceback, r.children, r.group_id,
       r.parent_id, r.name, r.args, r.kwargs, r.worker, r.retries, r.queue, r.date_done
FROM unnest(%(ahead)s::text[]) AS ahead(task_id)
CROSS JOIN LATERAL (
    SELECT * FROM {schema}.results
    WHERE task_id = ahead.task_id AND status IN ('SUCCESS', 'FAILURE', 'REVOKED')
      AND (expires_at IS NULL OR expires_at > now())
      AND coalesce(pg_column_size(result), 0) + coalesce(pg_column_size(result_bytes), 0)
          + coalesce(pg_column_size(traceback), 0) + coalesce(pg_column_size(children), 0)
          + coalesce(pg_column_size(args), 0) + coalesce(pg_column_size(kwargs), 0)
          <= %(max_bytes)s
      -- a compressed column is larger than its stored size says
      AND num_nulls(pg_column_compression(result), pg_column_compression(result_bytes),
                    pg_column_compression(traceback), pg_column_compression(children),
                    pg_column_compression(args), pg_column_compression(kwargs)) = 6
    LIMIT 1
) r;

-- name: get_results
-- The unexpired results of the given task ids (one round trip for one id or thousands), each
-- looked up by its key (see wait_and_read: as one scan, stale statistics may have it read the
-- whole table through the expiry index).
SELECT r.task_id, r.status, r.result, r.result_bytes, r.traceback, r.children, r.group_id,
       r.parent_id, r.name, r.args, r.kwargs, r.worker, r.retries, r.queue, r.date_done
FROM unnest(%(task_ids)s::text[]) AS wanted(task_id)
CROSS JOIN LATERAL (
    SELECT * FROM {schema}.results
    WHERE task_id = wanted.task_id AND (expires_at IS NULL OR expires_at > now())
    LIMIT 1
) r;

-- name: get_result
-- The unexpired result of one task (an equality lookup plans and runs faster than ANY).
SELECT task_id, status, result, result_bytes, traceback, children, group_id, parent_id,
       name, args, kwargs, worker, retries, queue, date_done
FROM {schema}.results
WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > now());

-- name: result_exists
-- Whether an unexpired result row exists for the task.
SELECT EXISTS (SELECT 1 FROM {schema}.results
               WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > now()));

-- name: forget_result
-- Delete one result.
DELETE FROM {schema}.results WHERE task_id = %(task_id)s;

-- name: save_group
-- Store (or replace) a GroupResult's member ids.
INSERT INTO {schema}.groups AS g (group_id, result, result_bytes, expires_at)
VALUES (%(group_id)s, %(result)s, %(result_bytes)s, now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    result = excluded.result, result_bytes = excluded.result_bytes,
    date_done = now(), expires_at = excluded.expires_at;

-- name: get_group
-- A saved, unexpired group.
SELECT result, result_bytes, date_done FROM {schema}.groups
WHERE group_id = %(group_id)s AND (expires_at IS NULL OR expires_at > now());

-- name: delete_group
-- Delete a saved group.
DELETE FROM {schema}.groups WHERE group_id = %(group_id)s;

-- name: reset_chord
-- A chord is being applied: start its counter from zero (a re-applied frozen chord reuses its id).
-- Chord rows live as long as the chord: %(expires)s is the in-flight expiry, pushed forward by
-- every statement below that touches the chord.
WITH gone AS (DELETE FROM {schema}.chord_parts WHERE group_id = %(group_id)s)
INSERT INTO {schema}.chords AS c (group_id, header_ids, expires_at)
VALUES (%(group_id)s, %(header_ids)s, now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    chord_size = NULL, extra = 0, extra_ids = '{{}}', completed = 0, claim_token = NULL,
    claim_until = NULL, fired = false, header_ids = excluded.header_ids, created_at = now(),
    expires_at = excluded.expires_at;

-- name: set_chord_size
-- Record how many header parts the chord waits for.
INSERT INTO {schema}.chords AS c (group_id, chord_size, expires_at)
VALUES (%(group_id)s, %(chord_size)s, now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET chord_size = excluded.chord_size,
                                     expires_at = excluded.expires_at;

-- name: add_to_chord
-- One more header part to wait for (a header task replaced itself with a new signature).
-- Keyed by the added task's id: the same call retried after a lost connection counts once.
INSERT INTO {schema}.chords AS c (group_id, extra, extra_ids, expires_at)
VALUES (%(group_id)s, 1, ARRAY[%(task_id)s::text],
        now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET extra = c.extra + 1,
                                     extra_ids = c.extra_ids || %(task_id)s::text,
                                     expires_at = excluded.expires_at
WHERE NOT (%(task_id)s::text = ANY(c.extra_ids));

-- name: chord_part_return
-- Record one header part exactly once and count it, atomically. When the count reaches the
-- chord size, the caller whose token lands in claim_token fires the body. A claim that is not
-- released (its holder died before firing) lapses at claim_until, so a redelivered header
-- task can take over. The same token may retry this statement after a lost connection.
-- Parts have no expiry of their own: they go with their chord (delete_orphan_chord_parts).
WITH part AS (
    INSERT INTO {schema}.chord_parts
        (group_id, task_id, idx, status, result, result_bytes)
    VALUES (%(group_id)s, %(task_id)s, %(idx)s, %(status)s, %(result)s, %(result_bytes)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
INSERT INTO {schema}.chords AS c (group_id, completed, expires_at)
SELECT %(group_id)s, count(*), now() + make_interval(secs => %(expires)s) FROM part
ON CONFLICT (group_id) DO UPDATE SET
    completed = c.completed + excluded.completed,
    expires_at = excluded.expires_at,
    claim_token = CASE WHEN c.chord_size IS NOT NULL
                        AND c.completed + excluded.completed >= c.chord_size + c.extra
                        AND (c.claim_token IS NULL OR c.claim_until < now()
                             OR c.claim_token = %(token)s)
                       THEN %(token)s ELSE c.claim_token END,
    claim_until = CASE WHEN c.chord_size IS NOT NULL
                        AND c.completed + excluded.completed >= c.chord_size + c.extra
                        AND (c.claim_token IS NULL OR c.claim_until < now()
                             OR c.claim_token = %(token)s)
                       THEN now() + make_interval(secs => %(claim_seconds)s)
                       ELSE c.claim_until END
WHERE NOT c.fired
RETURNING c.completed, c.chord_size, c.extra, coalesce(c.claim_token = %(token)s, false);

-- name: chord_parts
-- The header results of a chord, in header order (the flattened order recorded by apply_chord,
-- else group_index, then arrival).
SELECT p.task_id, p.status, p.result, p.result_bytes
FROM {schema}.chord_parts p LEFT JOIN {schema}.chords c USING (group_id)
WHERE p.group_id = %(group_id)s
ORDER BY array_position(c.header_ids, p.task_id), p.idx, p.seq;

-- name: chord_fired
-- The body was sent: mark the chord done and drop its parts. The row is kept for the results'
-- expiry, so late duplicate reports of a header part are ignored.
WITH done AS (
    UPDATE {schema}.chords SET fired = true, claim_until = NULL,
                               expires_at = now() + make_interval(secs => %(expires)s)
    WHERE group_id = %(group_id)s AND claim_token = %(token)s
    RETURNING group_id
)
DELETE FROM {schema}.chord_parts p USING done WHERE p.group_id = done.group_id;

-- name: delete_expired
-- Delete one bounded batch of expired rows from {table}; returns how many went.
-- SKIP LOCKED: never waits behind, or blocks, a writer of the same rows.
WITH doomed AS (
    DELETE FROM {schema}.{table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {schema}.{table} WHERE expires_at <= now()
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
    RETURNING 1
)
SELECT count(*) FROM doomed;

-- name: delete_orphan_chord_parts
-- Delete one bounded batch of header parts whose chord row is gone (expired or abandoned).
WITH doomed AS (
    DELETE FROM {schema}.chord_parts WHERE ctid = ANY(ARRAY(
        SELECT p.ctid FROM {schema}.chord_parts p
        WHERE NOT EXISTS (SELECT 1 FROM {schema}.chords c WHERE c.group_id = p.group_id)
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
    RETURNING 1
)
SELECT count(*) FROM doomed;

-- name: store_revoked
-- The broker revoked these tasks (their messages are gone, see revoke in broker.sql) and the
-- results are kept here, in another database or schema: they become REVOKED, unless finished,
-- and whoever waits for them is woken. Repeating it changes nothing more.
WITH stored AS (
    INSERT INTO {schema}.results AS r (task_id, status, result, date_done, expires_at)
    SELECT DISTINCT task_id, 'REVOKED', %(revoked_result)s::jsonb, now(),
           now() + make_interval(secs => %(result_expires)s)
    FROM unnest(%(task_ids)s::text[]) AS task_id
    ON CONFLICT (task_id) DO UPDATE SET status = 'REVOKED', result = excluded.result,
        date_done = excluded.date_done, expires_at = excluded.expires_at
    WHERE r.status NOT IN ('SUCCESS', 'FAILURE', 'REVOKED')
    RETURNING pg_notify(%(results_channel)s, r.task_id)
)
SELECT count(*) FROM stored;
