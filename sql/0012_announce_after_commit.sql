-- Stored results and published messages are announced after their commit, not by it. A NOTIFY
-- takes a lock on the whole database at commit and holds it until the commit is durable (its
-- WAL flushed and, with synchronous standbys, confirmed), so a store or publish that announced
-- in its own transaction made every other announcing commit of the database wait for its flush:
-- one flush after another, where plain commits share theirs (32 threads sending tasks and
-- waiting for their results: on average 11 backends waited on that lock).
--
-- Each procedure does what its statement did (and decides the same way whether to announce);
-- then, if it announces and p_commit_first, it commits first and announces in a second
-- transaction that does not wait for its flush: nothing in it needs to be durable. Without
-- p_commit_first (the caller runs it inside a transaction of its own, or its commits do not
-- wait for a flush anyway) it announces in the same transaction, as the statements do.

-- store_result: the result backend's store (see store_result in sql/queries/backend.sql). The
-- writing key's shared lock is held until the first commit, so a waiter's barrier still waits
-- for the result to be committed. An announcement lost between the two transactions (the
-- session ended there) leaves the result to the waiters' safety-net read, as for a result
-- stored without one. announced: whether it announced.
CREATE PROCEDURE {schema}.store_result(
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
    IF p_commit_first THEN
        COMMIT;
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    PERFORM pg_notify(p_channel, coalesce(p_announce, p_task_id));
END
$$;

-- publish_message: the transport's publish (see publish in sql/queries/broker.sql, which the
-- outbox still runs inside its caller's transaction: keep the two in step). A message handed
-- off to a consumer's offer is inserted leased to that consumer and sent whole in the
-- announcement; if the session ends between the two transactions, the consumer never hears of
-- it, and takes it back when it finds the hand-off late (kojin_pg/transport/offers.py).
CREATE PROCEDURE {schema}.publish_message(
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
    IF p_commit_first THEN
        COMMIT;
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    PERFORM pg_notify(v_channel, v_payload);
END
$$;
