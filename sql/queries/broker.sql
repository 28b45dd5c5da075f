-- Queries of the broker transport. Queue and exchange names are always bound parameters.

-- name: publish
-- Enqueue one message and wake consumers of its queue at commit.
WITH sent AS (
    INSERT INTO {schema}.messages (queue, priority, payload, visible_at)
    VALUES (%(queue)s, %(priority)s, %(payload)s, now() + make_interval(secs => %(delay)s))
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM sent WHERE %(notify)s;

-- name: publish_fanout
-- Enqueue a copy of the message for every queue bound to a fanout exchange; one NOTIFY each.
WITH sent AS (
    INSERT INTO {schema}.messages (queue, priority, payload)
    SELECT DISTINCT b.queue, %(priority)s, %(payload)s FROM {schema}.bindings b
    WHERE b.exchange = %(exchange)s
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM sent) q WHERE %(notify)s;

-- name: claim
-- Apply pending acks, then lease up to n visible messages of the given queues, in priority then FIFO order, skipping rows
-- other consumers are claiming. A message that was already delivered max_deliveries times goes
-- to the dead letters instead (returned with dead = true, payload NULL).
WITH acked AS (
    -- acks collected since the last claim, applied in the same round trip
    DELETE FROM {schema}.messages WHERE id = ANY(%(acks)s::bigint[])
), picked AS (
    -- per queue, so each walks messages_claim_idx in delivery order and stops after n rows:
    -- the claim costs the same with 10 or 10 million messages queued (queue = ANY(...) would
    -- read and sort the whole backlog).
    SELECT m.id, m.delivery_count
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, delivery_count, priority FROM {schema}.messages
        WHERE queue = q.name AND visible_at <= now()
        ORDER BY priority DESC, id
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    ) m
    ORDER BY m.priority DESC, m.id
    LIMIT %(n)s
), dead AS (
    DELETE FROM {schema}.messages m USING picked p
    WHERE m.id = p.id AND p.delivery_count >= %(max_deliveries)s
    RETURNING m.*
), buried AS (
    INSERT INTO {schema}.dead_letters
        (id, queue, priority, payload, delivery_count, reason, error, enqueued_at)
    SELECT id, queue, priority, payload, delivery_count, 'max_deliveries',
           'delivered ' || delivery_count || ' times without an ack', enqueued_at
    FROM dead
    ON CONFLICT (id) DO NOTHING
), claimed AS (
    UPDATE {schema}.messages m
    SET visible_at = now() + make_interval(secs => %(visibility_timeout)s),
        delivery_count = m.delivery_count + 1,
        leased_by = %(consumer)s
    FROM picked p
    WHERE m.id = p.id AND p.delivery_count < %(max_deliveries)s
    RETURNING m.id, m.queue, m.payload, m.delivery_count, m.priority
)
SELECT id, queue, payload, delivery_count, false AS dead, priority FROM claimed
UNION ALL
SELECT id, queue, NULL, delivery_count, true, priority FROM dead
ORDER BY dead, priority DESC, id;

-- name: ack
-- Acknowledged messages are done: delete them.
DELETE FROM {schema}.messages WHERE id = ANY(%(ids)s);

-- name: requeue
-- Make leased messages visible again now (reject with requeue, or a consumer shutting down).
WITH back AS (
    UPDATE {schema}.messages SET visible_at = now(), leased_by = NULL
    WHERE id = ANY(%(ids)s)
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM back) q WHERE %(notify)s;

-- name: dead_letter
-- Move messages to the dead letters with a reason (reject without requeue).
WITH dead AS (
    DELETE FROM {schema}.messages WHERE id = ANY(%(ids)s) RETURNING *
)
INSERT INTO {schema}.dead_letters
    (id, queue, priority, payload, delivery_count, reason, error, enqueued_at)
SELECT id, queue, priority, payload, delivery_count, %(reason)s, %(error)s, enqueued_at FROM dead
ON CONFLICT (id) DO NOTHING;

-- name: extend_leases
-- Push out the leases this consumer still holds; returns the ids it still holds.
UPDATE {schema}.messages
SET visible_at = now() + make_interval(secs => %(visibility_timeout)s)
WHERE id = ANY(%(ids)s) AND leased_by = %(consumer)s
RETURNING id;

-- name: queue_size
-- Messages ready for delivery in a queue.
SELECT count(*) FROM {schema}.messages WHERE queue = %(queue)s AND visible_at <= now();

-- name: purge
-- Delete the ready (not leased, not delayed) messages of a queue.
WITH gone AS (
    DELETE FROM {schema}.messages WHERE queue = %(queue)s AND visible_at <= now() RETURNING 1
)
SELECT count(*) FROM gone;

-- name: delete_queue
-- Delete a queue: its messages and its bindings.
WITH gone AS (DELETE FROM {schema}.messages WHERE queue = %(queue)s)
DELETE FROM {schema}.bindings WHERE queue = %(queue)s;

-- name: has_queue
-- Whether a queue is bound to an exchange or holds messages.
SELECT EXISTS (SELECT 1 FROM {schema}.bindings WHERE queue = %(queue)s)
    OR EXISTS (SELECT 1 FROM {schema}.messages WHERE queue = %(queue)s);

-- name: bind
-- Bind a queue to an exchange (idempotent).
INSERT INTO {schema}.bindings (exchange, routing_key, pattern, queue)
VALUES (%(exchange)s, %(routing_key)s, %(pattern)s, %(queue)s)
ON CONFLICT DO NOTHING;

-- name: unbind
-- Remove one binding.
DELETE FROM {schema}.bindings
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s;

-- name: bindings_of
-- The bindings of an exchange, as kombu's routing table rows.
SELECT routing_key, pattern, queue FROM {schema}.bindings WHERE exchange = %(exchange)s;

-- name: queue_stats
-- Per queue: ready, leased and delayed counts, and the age of the oldest ready message.
SELECT queue,
       count(*) FILTER (WHERE visible_at <= now()),
       count(*) FILTER (WHERE visible_at > now() AND leased_by IS NOT NULL),
       count(*) FILTER (WHERE visible_at > now() AND leased_by IS NULL),
       extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE visible_at <= now()))::float8
FROM {schema}.messages GROUP BY queue ORDER BY queue;

-- name: dead_letter_counts
-- Dead letters per queue.
SELECT queue, count(*) FROM {schema}.dead_letters GROUP BY queue ORDER BY queue;

-- name: dlq_list
-- Dead letters, newest first, optionally of one queue.
SELECT id, queue, delivery_count, reason, error, dead_at, payload->'headers'->>'task'
FROM {schema}.dead_letters
WHERE %(queue)s::text IS NULL OR queue = %(queue)s
ORDER BY id DESC LIMIT %(limit)s;

-- name: dlq_show
-- One dead letter with its payload.
SELECT id, queue, priority, delivery_count, reason, error, enqueued_at, dead_at, payload
FROM {schema}.dead_letters WHERE id = %(id)s;

-- name: dlq_requeue
-- Move dead letters back to their queues with a fresh delivery count.
WITH back AS (
    DELETE FROM {schema}.dead_letters
    WHERE (%(all)s OR id = ANY(%(ids)s) OR queue = %(queue)s)
    RETURNING queue, priority, payload
), sent AS (
    INSERT INTO {schema}.messages (queue, priority, payload)
    SELECT queue, priority, payload FROM back
    RETURNING queue
)
SELECT count(*), count(pg_notify(%(channel)s, queue)) FROM sent;

-- name: dlq_purge
-- Delete dead letters.
WITH gone AS (
    DELETE FROM {schema}.dead_letters
    WHERE (%(all)s OR id = ANY(%(ids)s) OR queue = %(queue)s)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: release_orphans
-- After a claim retried on a new connection: the lost attempt may have committed leases this
-- consumer never received. Hand back whatever it holds a lease on but does not know about.
WITH back AS (
    UPDATE {schema}.messages SET visible_at = now(), leased_by = NULL
    WHERE leased_by = %(consumer)s AND NOT (id = ANY(%(keep)s::bigint[]))
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM back) q WHERE %(notify)s;
