-- A store or publish that announces no longer makes its announcement wait for its WAL flush.
-- Migration 12 committed durably first and announced in a second transaction, so a waiter heard
-- of a result, and an idle worker got a handed-off message, only one flush after the write: on
-- a task's round trip, two flushes (the publish's and the result's) lay between the caller's
-- delay() and its result. Now the first transaction writes and announces, and commits without
-- waiting for its flush; the second waits for a flush that covers the first, before the
-- procedure returns. So the worker starts on the message, and the waiter reads the result,
-- while the flush is under way.
--
-- What the caller is told is unchanged: the procedure returns only once its write is durable
-- (flushed and, with synchronous standbys, confirmed), as before. What others see is earlier:
-- a consumer may receive a message, and a waiter a result, whose commit is not durable yet. If
-- the server crashes in between, the write is lost with it, and the caller, which has not been
-- told it is done, runs the statement again on a new connection (as after any lost connection:
-- the publish inserts once by its publish_id, the store writes the same row) or gets an error.
-- A message published again may run its task again, which at-least-once delivery allows; a
-- result a waiter has read is gone from the table until the store is run again. This is
-- PostgreSQL's own synchronous_commit=off visibility, for the time of one flush, on what is
-- announced only.
--
-- Still no commit waits for its flush while holding the database's NOTIFY lock: the first
-- transaction's commit does not wait, and the second sends no NOTIFY. The second transaction
-- writes one transactional logical-decoding message (prefix 'kojin_pg.flush', no content): a
-- transaction that writes no WAL commits without waiting for a flush, whatever
-- synchronous_commit says. Logical decoding clients that ask for messages see it.
--
-- The announcement now commits with the write, so a full notification queue fails the whole
-- statement with nothing written (before, the write committed and the statement raised).
-- Same signatures as migration 12: processes of the older version call these as they are.

CREATE OR REPLACE PROCEDURE {schema}.store_result(
    p_task_id text, p_status text, p_result jsonb, p_result_bytes bytea, p_traceback text,
    p_children jsonb, p_group_id text, p_parent_id text, p_name text, p_args jsonb,
    p_kwargs jsonb, p_worker text, p_retries int, p_queue text, p_date_done timestamptz,
    p_expires float8, p_notify boolean, p_channel text, p_announce text, p_wait_space int,
    p_writing_space int, p_wait_slot int, p_sender_key int, p_commit_first boolean,
    INOUT announced boolean DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    -- A stored SUCCESS is never overwritten: a late duplicate run of a task must not replace it.
    WITH stored AS (
        INSERT INTO {schema}.results AS r
            (task_id, status, result, result_bytes, traceback, children, group_id, parent_id,
             name, args, kwargs, worker, retries, queue, date_done, expires_at)
        VALUES (p_task_id, p_status, p_result, p_result_bytes, p_traceback, p_children,
                p_group_id, p_parent_id, p_name, p_args, p_kwargs, p_worker, p_retries, p_queue,
                p_date_done, now() + make_interval(secs => p_expires))
        ON CONFLICT (task_id) DO UPDATE SET
            status = excluded.status,
            result = excluded.result,
            result_bytes = excluded.result_bytes,
            traceback = excluded.traceback,
            children = excluded.children,
            group_id = coalesce(excluded.group_id, r.group_id),
            parent_id = coalesce(excluded.parent_id, r.parent_id),
            name = coalesce(excluded.name, r.name),
            args = coalesce(excluded.args, r.args),
            kwargs = coalesce(excluded.kwargs, r.kwargs),
            worker = coalesce(excluded.worker, r.worker),
            retries = coalesce(excluded.retries, r.retries),
            queue = coalesce(excluded.queue, r.queue),
            date_done = excluded.date_done,
            expires_at = excluded.expires_at
        WHERE r.status <> 'SUCCESS'
        RETURNING r.task_id
    )
    SELECT CASE WHEN NOT p_notify THEN false
                -- CASE keeps this order: each writing lock first, then its probe
                WHEN pg_advisory_xact_lock_shared(p_writing_space, p_wait_slot) IS NULL THEN false
                WHEN NOT pg_try_advisory_lock(p_wait_space, p_wait_slot) THEN true
                WHEN NOT pg_advisory_unlock(p_wait_space, p_wait_slot) THEN true
                WHEN p_sender_key IS NULL THEN false
                WHEN pg_advisory_xact_lock_shared(p_writing_space, p_sender_key) IS NULL
                THEN false
                WHEN pg_try_advisory_lock(p_wait_space, p_sender_key)
                THEN NOT pg_advisory_unlock(p_wait_space, p_sender_key)
                ELSE true END
    INTO announced FROM stored;
    announced := coalesce(announced, false);  -- no row: a SUCCESS was stored already
    IF NOT announced THEN
        RETURN;
    END IF;
    PERFORM pg_notify(p_channel, coalesce(p_announce, p_task_id));
    IF p_commit_first THEN
        PERFORM set_config('synchronous_commit', 'off', true);
        COMMIT;
        PERFORM pg_logical_emit_message(true, 'kojin_pg.flush', '');
    END IF;
END
$$;

-- publish_message: as in migration 12, with the announcement in the first transaction.
CREATE OR REPLACE PROCEDURE {schema}.publish_message(
    p_queue text, p_priority int, p_payload jsonb, p_publish_id uuid, p_due_at timestamptz,
    p_expiration float8, p_task_id text, p_unique_key text, p_handoff boolean,
    p_offer_space int, p_channel text, p_notify boolean, p_publishing_space int,
    p_idle_space int, p_queue_key int, p_commit_first boolean,
    INOUT announced boolean DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text;
    v_payload text;
BEGIN
    WITH q AS (
        SELECT message_ttl, deleted_at FROM {schema}.queues WHERE name = p_queue
    ), offer AS (
        UPDATE {schema}.offers o
        SET open_slots = o.open_slots - 1, served_at = now(),
            token = CASE WHEN o.open_slots > 1 THEN o.token END
        FROM (
            SELECT slot, token FROM {schema}.offers
            WHERE p_handoff AND token IS NOT NULL AND open_slots > 0 AND p_queue = ANY(queues)
              AND octet_length(p_payload::text) + octet_length(p_queue) <= 7800
              AND NOT EXISTS (SELECT 1 FROM q WHERE deleted_at IS NOT NULL)
              AND NOT EXISTS (SELECT 1 FROM {schema}.messages WHERE publish_id = p_publish_id)
              AND NOT pg_try_advisory_xact_lock_shared(p_offer_space, live_key)
            ORDER BY served_at
            LIMIT 1 FOR UPDATE SKIP LOCKED
        ) taken
        WHERE o.slot = taken.slot
        RETURNING taken.token, o.consumer, o.notify_channel, o.lease
    ), sent AS (
        INSERT INTO {schema}.messages
            (queue, priority, payload, visible_at, publish_id, expires_at, due_at, task_id,
             unique_key, leased_by, delivery_count)
        SELECT p_queue, p_priority, p_payload,
               coalesce(now() + (SELECT lease FROM offer), p_due_at, now()), p_publish_id,
               least(now() + make_interval(secs => p_expiration),
                     now() + (SELECT message_ttl FROM q)),
               p_due_at, p_task_id, p_unique_key,
               (SELECT consumer FROM offer), (SELECT count(*) FROM offer)::int
        WHERE NOT EXISTS (SELECT 1 FROM q WHERE deleted_at IS NOT NULL)
        ON CONFLICT DO NOTHING
        RETURNING id, queue, due_at, leased_by
    )
    SELECT CASE WHEN leased_by IS NULL THEN p_channel
                ELSE (SELECT notify_channel FROM offer) END,
           CASE WHEN leased_by IS NULL THEN queue
                ELSE jsonb_build_array((SELECT token FROM offer), id, queue, p_priority,
                                       p_payload)::text END
    INTO v_channel, v_payload
    FROM sent
    WHERE CASE WHEN leased_by IS NOT NULL THEN true
               WHEN NOT p_notify THEN false
               WHEN due_at IS NOT NULL AND EXISTS (
                   SELECT 1 FROM {schema}.messages m
                   WHERE m.queue = sent.queue AND m.due_at IS NOT NULL
                     AND m.due_at <= sent.due_at)
               THEN false
               -- CASE keeps this order: the publishing lock first, then the idle probe
               WHEN pg_advisory_xact_lock_shared(p_publishing_space, p_queue_key) IS NULL
               THEN false
               WHEN pg_try_advisory_lock(p_idle_space, p_queue_key)
               THEN NOT pg_advisory_unlock(p_idle_space, p_queue_key)
               ELSE true END;
    announced := v_channel IS NOT NULL;
    IF NOT announced THEN
        RETURN;
    END IF;
    PERFORM pg_notify(v_channel, v_payload);
    IF p_commit_first THEN
        PERFORM set_config('synchronous_commit', 'off', true);
        COMMIT;
        PERFORM pg_logical_emit_message(true, 'kojin_pg.flush', '');
    END IF;
END
$$;
