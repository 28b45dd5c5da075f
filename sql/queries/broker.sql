-- Queries of the broker transport. Queue and exchange names are always bound parameters.

-- name: publish
-- Enqueue one message and wake consumers of its queue at commit, if one may be idle (see
-- kojin_pg/transport/idle.py: a shared lock on the queue's publishing key is held to the commit,
-- then the idle key is probed; a failed probe means a consumer waits). publish_id (made by the
-- client) makes the same publish retried after a lost commit reply insert nothing, and so does
-- a unique_key already queued or scheduled in the queue. A queue deleted for being unused (a
-- tombstone in queues) takes nothing, as on RabbitMQ; the queue's message TTL and the message's
-- own expiration (seconds, or NULL) set expires_at. A scheduled message (due_at) wakes the
-- queue's consumers only when it is the queue's new earliest, so they can set their timers.
-- With handoff (a ready message small enough for a NOTIFY), the message first fills a slot of
-- a live consumer's open offer, if there is one (see kojin_pg/transport/offers.py): it is
-- inserted leased to that consumer, and sent whole on the consumer's own channel. No offer is
-- taken by a publish that will insert nothing (a deleted queue, or the same publish retried).
-- The transport runs this as the procedure publish_message (below) when its commits wait for
-- the WAL flush, and here otherwise; the outbox runs it here, in its caller's
-- transaction: keep the two in step.
WITH q AS (
    SELECT message_ttl, deleted_at FROM {schema}.queues WHERE name = %(queue)s
), offer AS (
    UPDATE {schema}.offers o
    SET open_slots = o.open_slots - 1, served_at = now(),
        token = CASE WHEN o.open_slots > 1 THEN o.token END  -- the last slot: the offer is used up
    FROM (
        SELECT slot, token FROM {schema}.offers
        WHERE %(handoff)s AND token IS NOT NULL AND open_slots > 0 AND %(queue)s = ANY(queues)
          -- what the NOTIFY sends must stay under 8000 bytes, with the ids around it
          AND octet_length(%(payload)s::text) + octet_length(%(queue)s) <= 7800
          AND NOT EXISTS (SELECT 1 FROM q WHERE deleted_at IS NOT NULL)
          AND NOT EXISTS (SELECT 1 FROM {schema}.messages WHERE publish_id = %(publish_id)s)
          -- alive: its LISTEN session holds the exclusive lock, so a shared try fails
          AND NOT pg_try_advisory_xact_lock_shared(%(offer_space)s, live_key)
        -- the consumer served longest ago first: idle consumers are served in turn
        ORDER BY served_at
        LIMIT 1 FOR UPDATE SKIP LOCKED
    ) taken
    WHERE o.slot = taken.slot
    RETURNING taken.token, o.consumer, o.notify_channel, o.lease
), sent AS (
    INSERT INTO {schema}.messages
        (queue, priority, payload, visible_at, publish_id, expires_at, due_at, task_id, unique_key,
         leased_by, delivery_count)
    SELECT %(queue)s, %(priority)s, %(payload)s,
           coalesce(now() + (SELECT lease FROM offer), %(due_at)s, now()), %(publish_id)s,
           least(now() + make_interval(secs => %(expiration)s), now() + (SELECT message_ttl FROM q)),
           %(due_at)s, %(task_id)s, %(unique_key)s,
           (SELECT consumer FROM offer), (SELECT count(*) FROM offer)::int
    WHERE NOT EXISTS (SELECT 1 FROM q WHERE deleted_at IS NOT NULL)
    ON CONFLICT DO NOTHING
    RETURNING id, queue, due_at, leased_by
)
SELECT CASE WHEN leased_by IS NULL THEN pg_notify(%(channel)s, queue)
            ELSE pg_notify((SELECT notify_channel FROM offer), jsonb_build_array(
                (SELECT token FROM offer), id, queue, %(priority)s, %(payload)s)::text) END
FROM sent
WHERE CASE WHEN leased_by IS NOT NULL THEN true
           WHEN NOT %(notify)s THEN false
           WHEN due_at IS NOT NULL AND EXISTS (
               SELECT 1 FROM {schema}.messages m
               WHERE m.queue = sent.queue AND m.due_at IS NOT NULL AND m.due_at <= sent.due_at)
           THEN false
           -- CASE keeps this order: the publishing lock first, then the idle probe
           WHEN pg_advisory_xact_lock_shared(%(publishing_space)s, %(queue_key)s) IS NULL
           THEN false
           WHEN pg_try_advisory_lock(%(idle_space)s, %(queue_key)s)
           THEN NOT pg_advisory_unlock(%(idle_space)s, %(queue_key)s)
           ELSE true END;

-- name: publish_message
-- The publish above, by the procedure of sql/0013 (what the transport runs): with commit_first
-- (not inside a transaction), a message it announces or hands off commits with its
-- announcement without waiting for the WAL flush, then a second transaction waits for the
-- flush, so that no commit holds the database's NOTIFY lock across a flush and the consumer
-- starts while the flush is under way. It returns once the message is durable. Returns
-- whether it announced.
CALL {schema}.publish_message(
    %(queue)s::text, %(priority)s::int, %(payload)s::jsonb, %(publish_id)s::uuid,
    %(due_at)s::timestamptz, %(expiration)s::float8, %(task_id)s::text, %(unique_key)s::text,
    %(handoff)s::boolean, %(offer_space)s::int, %(channel)s::text, %(notify)s::boolean,
    %(publishing_space)s::int, %(idle_space)s::int, %(queue_key)s::int,
    %(commit_first)s::boolean);

-- name: wake_at_commit
-- The outbox, after its publish (with notify off) in the caller's transaction: have the
-- caller's commit wake the queue's idle consumers, if any (sql/0008_outbox_wakeups.sql). As for
-- a publish, a scheduled message wakes them only when it is the queue's new earliest (its own
-- row is visible here, hence <).
INSERT INTO {schema}.outbox_wakeups (queue, channel, idle_space, publishing_space, queue_key)
SELECT %(queue)s, %(channel)s, %(idle_space)s, %(publishing_space)s, %(queue_key)s
WHERE %(due_at)s::timestamptz IS NULL OR NOT EXISTS (
    SELECT 1 FROM {schema}.messages m
    WHERE m.queue = %(queue)s AND m.due_at IS NOT NULL AND m.due_at < %(due_at)s);

-- name: announce_sent
-- The outbox, after the caller's commit (kojin_pg.outbox.transaction): wake the idle consumers
-- of a queue it sent to, in a transaction of its own that does not wait for its flush (a
-- NOTIFY holds the database's NOTIFY lock until its commit is durable; nothing here needs to
-- be). The messages are committed already, so no publishing lock is needed: a consumer that
-- goes idle after the probe claims once more, and sees them. As for a publish, a scheduled
-- message wakes them only when it is the queue's earliest (its own row is visible, hence <).
SELECT set_config('synchronous_commit', 'off', true), count(pg_notify(%(channel)s, %(queue)s))
WHERE CASE WHEN %(due_at)s::timestamptz IS NOT NULL AND EXISTS (
               SELECT 1 FROM {schema}.messages m
               WHERE m.queue = %(queue)s AND m.due_at IS NOT NULL AND m.due_at < %(due_at)s)
           THEN false
           -- the probe in one expression: see sql/0008_outbox_wakeups.sql
           WHEN pg_try_advisory_lock(%(idle_space)s, %(queue_key)s)
           THEN NOT pg_advisory_unlock(%(idle_space)s, %(queue_key)s)
           ELSE true END;

-- name: announce_queue
-- Wake the queue's consumers at commit, whoever they are (the outbox on a schema before
-- migration 8).
SELECT pg_notify(%(channel)s, %(queue)s);

-- name: relation_exists
-- Whether a table (a quoted, schema-qualified name) exists.
SELECT to_regclass(%(relation)s) IS NOT NULL;

-- name: go_idle
-- On a consumer's LISTEN session: say that it waits on these queues (shared idle locks, held
-- until leave_idle or the session ends), then wait for the publishes in flight to commit (the
-- exclusive publishing lock, taken and given back at once). A claim after this sees every
-- message whose publish did not see the consumer idle.
SELECT count(pg_advisory_lock_shared(%(idle_space)s, k)),
       count(pg_advisory_lock(%(publishing_space)s, k)),
       count(pg_advisory_unlock(%(publishing_space)s, k))
FROM unnest(%(keys)s::int[]) AS k;

-- name: leave_idle
-- On a consumer's LISTEN session: it no longer waits on these queues (it has a backlog).
SELECT count(pg_advisory_unlock_shared(%(idle_space)s, k)) FROM unnest(%(keys)s::int[]) AS k;

-- name: make_offer
-- A consumer with nothing left to claim offers free prefetch slots of one of its channels on
-- these queues to the publishers (see the publish, and kojin_pg/transport/offers.py); lease: its
-- visibility timeout. The offer is spread over the channel's rows (made once, then updated),
-- open[i] slots on rows[i]: a publish filling a slot locks its row until it commits, and
-- publishes in flight meanwhile fill the other rows instead of skipping the offer. The first row
-- goes to the back of the line (served_at); the others queue behind every row served so far
-- (a day on), so that publishes one at a time serve idle consumers in turn, and the spare rows
-- serve those that find the first ones locked.
INSERT INTO {schema}.offers AS o
    (slot, token, open_slots, served_at, consumer, queues, notify_channel, lease, live_key)
SELECT r.slot, CASE WHEN r.open > 0 THEN %(token)s::uuid END, r.open,
       now() + (r.i - 1) * interval '1 day', %(consumer)s, %(queues)s, %(notify_channel)s,
       make_interval(secs => %(lease)s), %(live_key)s
FROM unnest(%(rows)s::uuid[], %(open)s::int[]) WITH ORDINALITY AS r(slot, open, i)
ON CONFLICT (slot) DO UPDATE SET token = excluded.token, open_slots = excluded.open_slots,
                                 served_at = excluded.served_at, queues = excluded.queues,
                                 live_key = excluded.live_key;

-- name: withdraw_offer
-- Take back a channel's offer before it claims, and say how many of its slots were still open
-- (the others were filled by publishes), with how many of its rows were found. A publish
-- filling a slot locks the row: this waits for its commit, so every message handed off with
-- the offer is leased (and on its way) once this returns. A cleared token means every slot of
-- the row was filled: by publishes of this version, which count open_slots down to 0, or last
-- by one of the version before migration 11, which cleared the token without counting its
-- slot. A row missing: the sweep found the consumer's session dead.
WITH withdrawn AS (
    UPDATE {schema}.offers o SET token = NULL, open_slots = 0
    FROM (SELECT slot, token, open_slots FROM {schema}.offers
          WHERE slot = ANY(%(rows)s::uuid[]) ORDER BY slot FOR UPDATE) old
    WHERE o.slot = old.slot AND (old.token = %(token)s OR old.token IS NULL)
    RETURNING CASE WHEN old.token IS NULL THEN greatest(old.open_slots - 1, 0)
                   ELSE old.open_slots END AS open_left
)
SELECT coalesce(sum(open_left), 0)::int, count(*)::int FROM withdrawn;

-- name: top_up_offer
-- Add slots to a channel's open offer as it runs low (kojin_pg/transport/offers.py): the slots
-- freed since it was made, so that publishes do not find it used up while the consumer has
-- room. They go to the offer's rows used up (token cleared by the publish that filled the last
-- slot, and no publish fills such a row), spread evenly: publishes take the row served longest
-- ago, so an offer's rows are used up one after the other. Returns how many slots were added
-- (none if no row is used up yet).
WITH used_up AS (
    SELECT slot, (row_number() OVER (ORDER BY slot) - 1)::int AS i, count(*) OVER ()::int AS n
    FROM {schema}.offers
    WHERE slot = ANY(%(rows)s::uuid[]) AND token IS NULL AND open_slots = 0
), added AS (
    UPDATE {schema}.offers o
    SET token = %(token)s,
        open_slots = %(add)s::int / n + CASE WHEN i < mod(%(add)s::int, n) THEN 1 ELSE 0 END
    FROM used_up
    WHERE o.slot = used_up.slot AND o.token IS NULL AND o.open_slots = 0
    RETURNING o.open_slots
)
SELECT coalesce(sum(open_slots), 0)::int FROM added;

-- name: count_open_slots
-- How many slots of a channel's open offer are still open, counted as withdraw_offer counts
-- them, with how many of its rows were found: the polling round's look for hand-offs lost on
-- their way (kojin_pg/transport/offers.py). A read: the offer stays open, and a publish filling
-- a slot meanwhile is not waited for (its slot counts as open until it commits).
SELECT coalesce(sum(CASE WHEN token IS NULL THEN greatest(open_slots - 1, 0)
                         ELSE open_slots END), 0)::int, count(*)::int
FROM {schema}.offers
WHERE slot = ANY(%(rows)s::uuid[]) AND (token = %(token)s OR token IS NULL);

-- name: withdraw_all_offers
-- Take back every offer of this consumer (it closes, or listens on a new session).
DELETE FROM {schema}.offers WHERE consumer = %(consumer)s;

-- name: hold_live_lock
-- On a consumer's LISTEN session: its offers are good while this lock is held (see offers);
-- false if another session holds it (the caller picks another key).
SELECT pg_try_advisory_lock(%(offer_space)s, %(live_key)s);

-- name: publish_fanout
-- Enqueue a copy of the message for every queue bound to a fanout exchange; one NOTIFY each.
-- Each copy's publish_id is derived from the publish's and the queue's name (insert once).
WITH sent AS (
    INSERT INTO {schema}.messages (queue, priority, payload, publish_id, expires_at)
    SELECT b.queue, %(priority)s, %(payload)s, md5(%(publish_id)s::text || b.queue)::uuid,
           least(now() + make_interval(secs => %(expiration)s), now() + q.message_ttl)
    FROM (SELECT DISTINCT queue FROM {schema}.bindings WHERE exchange = %(exchange)s) b
    LEFT JOIN {schema}.queues q ON q.name = b.queue
    WHERE q.deleted_at IS NULL
    ON CONFLICT (publish_id) DO NOTHING
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM sent) q WHERE %(notify)s;

-- name: claim
-- Apply pending acks, then lease up to n deliverable messages of the given queues: ready ones
-- in priority then FIFO order, and scheduled ones now due, skipping rows other consumers are
-- claiming. A picked message that is not to be delivered (delivered max_deliveries times, or
-- revoked) is left as it is and returned with unsettled = true, payload NULL, for the caller to
-- settle (see settle): burying and dropping here would cost every claim the work of opening the
-- dead letters and results (about a fifth of a claim's round trip), for rows that are rare.
-- One more row, with id NULL, says in how many seconds the earliest scheduled message of these
-- queues is due (none: no such row).
WITH acked AS (
    -- acks collected since the last claim, applied in the same round trip
    DELETE FROM {schema}.messages WHERE id = ANY(%(acks)s::bigint[])
), ready AS (
    -- per queue, so each walks messages_claim_idx in delivery order and stops after n rows:
    -- the claim costs the same with 10 or 10 million messages queued (queue = ANY(...) would
    -- read and sort the whole backlog), and scheduled rows are not in that index at all.
    SELECT m.*
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, delivery_count, priority, revoked FROM {schema}.messages
        WHERE queue = q.name AND due_at IS NULL AND visible_at <= now()
          AND (expires_at IS NULL OR expires_at > now())  -- expired: never delivered
        ORDER BY priority DESC, id
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    ) m
), due AS (
    SELECT m.*
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, delivery_count, priority, revoked FROM {schema}.messages
        WHERE queue = q.name AND due_at <= now()
          AND (expires_at IS NULL OR expires_at > now())
        ORDER BY due_at
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    ) m
), picked AS (
    SELECT * FROM ready UNION ALL SELECT * FROM due
    ORDER BY priority DESC, id
    LIMIT %(n)s
), claimed AS (
    -- id = ANY(ARRAY(...)), not a join: the plan is made once per session (generic), and a
    -- join planned for an unknown batch size can turn into a scan of the whole table
    UPDATE {schema}.messages m
    SET visible_at = now() + make_interval(secs => %(visibility_timeout)s),
        delivery_count = m.delivery_count + 1,
        leased_by = %(consumer)s,
        due_at = NULL,      -- leased now: from here on like any other message
        unique_key = NULL   -- no longer queued: the same key may be enqueued again
    WHERE m.id = ANY(ARRAY(SELECT id FROM picked
                           WHERE delivery_count < %(max_deliveries)s AND NOT revoked))
    RETURNING m.id, m.queue, m.payload, m.delivery_count, m.priority
), next_due AS (
    SELECT min(d.due_at) AS at
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT due_at FROM {schema}.messages
        WHERE queue = q.name AND due_at > now()
        ORDER BY due_at LIMIT 1
    ) d
)
SELECT id, queue, payload, delivery_count, false AS unsettled, priority, NULL::float8 AS due_in
FROM claimed
UNION ALL
SELECT id, NULL, NULL, delivery_count, true, priority, NULL FROM picked
WHERE delivery_count >= %(max_deliveries)s OR revoked
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, extract(epoch FROM at - now())::float8
FROM next_due WHERE at IS NOT NULL
ORDER BY unsettled, priority DESC, id;

-- name: waiting
-- Whether these queues hold a message that claim would take now (as its ready and due parts
-- find them, rows other consumers are claiming included), and in how many seconds their
-- earliest scheduled message is due (NULL: none), as claim reports it. A consumer with no room
-- beside its open offer looks before it withdraws the offer to claim
-- (kojin_pg/transport/transport.py). A read: it leases nothing.
SELECT EXISTS (
           SELECT 1 FROM unnest(%(queues)s::text[]) AS q(name)
           CROSS JOIN LATERAL (
               SELECT id FROM {schema}.messages
               WHERE queue = q.name AND due_at IS NULL AND visible_at <= now()
                 AND (expires_at IS NULL OR expires_at > now())
               ORDER BY priority DESC, id
               LIMIT 1
           ) m)
       OR EXISTS (
           SELECT 1 FROM unnest(%(queues)s::text[]) AS q(name)
           CROSS JOIN LATERAL (
               SELECT id FROM {schema}.messages
               WHERE queue = q.name AND due_at <= now()
                 AND (expires_at IS NULL OR expires_at > now())
               ORDER BY due_at
               LIMIT 1
           ) m),
       (SELECT extract(epoch FROM min(d.due_at) - now())::float8
        FROM unnest(%(queues)s::text[]) AS q(name)
        CROSS JOIN LATERAL (
            SELECT due_at FROM {schema}.messages
            WHERE queue = q.name AND due_at > now()
            ORDER BY due_at LIMIT 1
        ) d);

-- name: settle
-- The messages a claim left unsettled: one delivered max_deliveries times goes to the dead
-- letters (returned as id, queue, count), one revoked is dropped (with store_results its result
-- becomes REVOKED here; results kept elsewhere were recorded before, see revoked_task_ids).
-- Each is taken again under its row lock, as a claim would take it (deliverable now, nobody
-- else's lease), so one that another consumer settled or leased meanwhile is left alone.
WITH picked AS (
    SELECT id, delivery_count, revoked FROM {schema}.messages
    WHERE id = ANY(%(ids)s::bigint[]) AND visible_at <= now()
      AND (expires_at IS NULL OR expires_at > now())
      AND (delivery_count >= %(max_deliveries)s OR revoked)
    FOR UPDATE SKIP LOCKED
), dead AS (
    DELETE FROM {schema}.messages m
    WHERE m.id = ANY(ARRAY(SELECT id FROM picked WHERE NOT revoked))
    RETURNING m.*
), buried AS (
    INSERT INTO {schema}.dead_letters
        (id, queue, priority, payload, delivery_count, reason, error, enqueued_at)
    SELECT id, queue, priority, payload, delivery_count, 'max_deliveries',
           'delivered ' || delivery_count || ' times without an ack', enqueued_at
    FROM dead
    ON CONFLICT (id) DO NOTHING
), dropped AS (
    DELETE FROM {schema}.messages m
    WHERE m.id = ANY(ARRAY(SELECT id FROM picked WHERE revoked))
    RETURNING m.task_id
), revoked_results AS (
    INSERT INTO {schema}.results AS r (task_id, status, result, date_done, expires_at)
    SELECT task_id, 'REVOKED', %(revoked_result)s, now(),
           now() + make_interval(secs => %(result_expires)s)
    FROM dropped WHERE task_id IS NOT NULL AND %(store_results)s
    ON CONFLICT (task_id) DO UPDATE SET status = 'REVOKED', result = excluded.result,
        date_done = excluded.date_done, expires_at = excluded.expires_at
    WHERE r.status NOT IN ('SUCCESS', 'FAILURE', 'REVOKED')
    RETURNING pg_notify(%(results_channel)s, r.task_id)  -- wakes whoever waits for it
)
SELECT id, queue, delivery_count FROM dead;

-- name: revoked_task_ids
-- The task ids of the revoked ones among messages a claim left unsettled, for results kept
-- in another database: recorded there before settle drops the messages (a revoked message is
-- never delivered, whoever drops it), so that a settle retried after a lost commit reply,
-- which finds them gone, cannot leave them unrecorded.
SELECT DISTINCT task_id FROM {schema}.messages
WHERE id = ANY(%(ids)s::bigint[]) AND revoked AND task_id IS NOT NULL;

-- name: ack
-- Acknowledged messages are done: delete them.
DELETE FROM {schema}.messages WHERE id = ANY(%(ids)s);

-- name: requeue
-- Make messages this consumer leases visible again now, their delivery counted (reject with
-- requeue). A message whose lease this consumer lost is someone else's: left alone.
WITH back AS (
    UPDATE {schema}.messages SET visible_at = now(), leased_by = NULL
    WHERE id = ANY(%(ids)s) AND leased_by = %(consumer)s
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM back) q WHERE %(notify)s;

-- name: hand_back
-- A clean hand-back (channel closed, worker shutdown): visible again now, and this delivery
-- does not count, so restarts never push a healthy message towards max_deliveries.
WITH back AS (
    UPDATE {schema}.messages
    SET visible_at = now(), leased_by = NULL, delivery_count = greatest(delivery_count - 1, 0)
    WHERE id = ANY(%(ids)s) AND leased_by = %(consumer)s
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM back) q WHERE %(notify)s;

-- name: dead_letter
-- Move messages this consumer leases to the dead letters with a reason (reject without
-- requeue, undecodable rows).
WITH dead AS (
    DELETE FROM {schema}.messages WHERE id = ANY(%(ids)s) AND leased_by = %(consumer)s
    RETURNING *
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
-- Delete the messages of a queue that no consumer holds: ready ones and scheduled ones (as
-- `celery purge` on a broker that keeps ETA tasks: nothing of the queue is left to run).
WITH gone AS (
    DELETE FROM {schema}.messages
    WHERE queue = %(queue)s AND (visible_at <= now() OR due_at IS NOT NULL)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: delete_queue
-- Delete a queue: its messages, its bindings, its declaration and its consumers.
WITH gone AS (DELETE FROM {schema}.messages WHERE queue = %(queue)s),
     undeclared AS (DELETE FROM {schema}.queues WHERE name = %(queue)s),
     forgotten AS (DELETE FROM {schema}.consumers WHERE queue = %(queue)s)
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
-- consumer never received. Hand back whatever it holds a lease on but does not know about
-- (never received: not a delivery).
WITH back AS (
    UPDATE {schema}.messages
    SET visible_at = now(), leased_by = NULL, delivery_count = greatest(delivery_count - 1, 0)
    WHERE leased_by = %(consumer)s AND NOT (id = ANY(%(keep)s::bigint[]))
    RETURNING queue
)
SELECT pg_notify(%(channel)s, queue) FROM (SELECT DISTINCT queue FROM back) q WHERE %(notify)s;

-- name: declare_queue
-- Record a declared queue and its RabbitMQ arguments (seconds, or NULL); declaring a deleted
-- queue again revives it. A plain queue declared again with the same arguments is not written.
INSERT INTO {schema}.queues AS q (name, message_ttl, expires, auto_delete)
VALUES (%(queue)s, make_interval(secs => %(message_ttl)s), make_interval(secs => %(expires)s),
        %(auto_delete)s)
ON CONFLICT (name) DO UPDATE SET
    message_ttl = excluded.message_ttl, expires = excluded.expires,
    auto_delete = excluded.auto_delete, last_used = now(), deleted_at = NULL,
    had_consumer = q.had_consumer AND q.deleted_at IS NULL
WHERE q.deleted_at IS NOT NULL OR q.expires IS NOT NULL OR excluded.expires IS NOT NULL
   OR q.auto_delete
   OR (q.message_ttl, q.auto_delete) IS DISTINCT FROM (excluded.message_ttl, excluded.auto_delete);

-- name: consumer_start
-- This consumer consumes the queue from now on (a live consumer keeps a queue from expiring).
WITH used AS (
    UPDATE {schema}.queues SET had_consumer = true, last_used = now()
    WHERE name = %(queue)s AND (NOT had_consumer OR expires IS NOT NULL)
)
INSERT INTO {schema}.consumers (queue, consumer) VALUES (%(queue)s, %(consumer)s)
ON CONFLICT (queue, consumer) DO UPDATE SET seen_at = now();

-- name: consumer_stop
-- This consumer stopped consuming the given queues (NULL: all of them). An auto_delete queue
-- that nobody else consumes is deleted now, as on RabbitMQ: bindings and messages go (unacked
-- ones too), its declaration stays as a tombstone.
WITH gone AS (
    DELETE FROM {schema}.consumers
    WHERE consumer = %(consumer)s AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s))
    RETURNING queue
), doomed AS (
    UPDATE {schema}.queues q SET deleted_at = now()
    FROM gone
    WHERE q.name = gone.queue AND q.auto_delete AND q.deleted_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM {schema}.consumers c
                      WHERE c.queue = q.name AND c.consumer <> %(consumer)s)
    RETURNING q.name
), unbound AS (
    DELETE FROM {schema}.bindings b USING doomed WHERE b.queue = doomed.name
)
DELETE FROM {schema}.messages m USING doomed WHERE m.queue = doomed.name;

-- name: consumers_alive
-- Live consumers say so (every sweep_interval): (queue, consumer) pairs, and the expiring
-- queues they consume count as used.
WITH seen AS (
    INSERT INTO {schema}.consumers (queue, consumer)
    SELECT * FROM unnest(%(queues)s::text[], %(consumers)s::text[])
    ON CONFLICT (queue, consumer) DO UPDATE SET seen_at = now()
)
UPDATE {schema}.queues SET last_used = now()
WHERE name = ANY(%(queues)s) AND expires IS NOT NULL;

-- name: sweep_lock
-- One sweeper at a time in the whole database (released at commit); false: another sweeps.
SELECT pg_try_advisory_xact_lock(hashtext(%(lock)s));

-- name: sweep_offers
-- Forget offers whose consumer's LISTEN session is gone (nobody holds their live lock).
DELETE FROM {schema}.offers WHERE pg_try_advisory_xact_lock_shared(%(offer_space)s, live_key);

-- name: sweep_consumers
-- Forget consumers that stopped saying they are alive (their process died).
DELETE FROM {schema}.consumers WHERE seen_at < now() - make_interval(secs => %(grace)s);

-- name: sweep_queues
-- Delete queues unused for longer than their x-expires, and auto_delete queues whose consumers
-- are all gone (and that nobody declared within the grace period: a process that declared it
-- is about to consume it): their bindings go now, their declaration stays as a tombstone.
WITH doomed AS (
    UPDATE {schema}.queues q SET deleted_at = now()
    WHERE q.deleted_at IS NULL
      AND ((q.expires IS NOT NULL AND q.last_used < now() - q.expires)
           OR (q.auto_delete AND q.had_consumer
               AND q.last_used < now() - make_interval(secs => %(grace)s)))
      AND NOT EXISTS (SELECT 1 FROM {schema}.consumers c WHERE c.queue = q.name)
    RETURNING q.name
)
DELETE FROM {schema}.bindings b USING doomed WHERE b.queue = doomed.name;

-- name: sweep_expired_messages
-- Delete one bounded batch of expired messages (a message leased right now is left to its
-- consumer).
WITH doomed AS (
    DELETE FROM {schema}.messages WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {schema}.messages
        WHERE expires_at <= now() AND (leased_by IS NULL OR visible_at <= now())
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
    RETURNING 1
)
SELECT count(*) FROM doomed;

-- name: sweep_orphan_messages
-- Delete one bounded batch of the messages of deleted queues, leased ones too (as RabbitMQ
-- drops a deleted queue's unacked messages: a late ack or hand-back then finds nothing).
WITH doomed AS (
    DELETE FROM {schema}.messages WHERE ctid = ANY(ARRAY(
        SELECT m.ctid FROM {schema}.queues q JOIN {schema}.messages m ON m.queue = q.name
        WHERE q.deleted_at IS NOT NULL
        LIMIT %(batch)s FOR UPDATE OF m SKIP LOCKED))
    RETURNING 1
)
SELECT count(*) FROM doomed;

-- name: sweep_tombstones
-- Forget deleted queues after a while (routing caches have long moved on).
DELETE FROM {schema}.queues
WHERE deleted_at < now() - make_interval(secs => %(keep)s)
  AND NOT EXISTS (SELECT 1 FROM {schema}.bindings b WHERE b.queue = queues.name);

-- name: publish_unique
-- Enqueue a message with a unique key; if the key is already queued or scheduled in the queue,
-- enqueue nothing. Returns the task id that holds the key and whether it is this one. The key
-- makes a retry after a lost commit reply find its own row.
WITH q AS (
    SELECT message_ttl, deleted_at FROM {schema}.queues WHERE name = %(queue)s
), sent AS (
    INSERT INTO {schema}.messages AS m
        (queue, priority, payload, visible_at, expires_at, due_at, task_id, unique_key)
    SELECT %(queue)s, %(priority)s, %(payload)s, coalesce(%(due_at)s, now()),
           least(now() + make_interval(secs => %(expiration)s), now() + (SELECT message_ttl FROM q)),
           %(due_at)s, %(task_id)s, %(unique_key)s
    WHERE NOT EXISTS (SELECT 1 FROM q WHERE deleted_at IS NOT NULL)
    ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL
    DO UPDATE SET unique_key = excluded.unique_key
    RETURNING m.queue, m.due_at, m.task_id, xmax = 0 AS inserted
)
SELECT task_id, inserted,
       CASE WHEN %(notify)s AND inserted AND (due_at IS NULL OR NOT EXISTS (
                SELECT 1 FROM {schema}.messages o
                WHERE o.queue = sent.queue AND o.due_at IS NOT NULL AND o.due_at < sent.due_at))
            THEN pg_notify(%(channel)s, queue) END
FROM sent;

-- name: revoke
-- Revoke tasks durably: queued and scheduled messages of these task ids are deleted and, with
-- store_results (the results are read from this schema), their results become REVOKED
-- (waiters are woken); one leased right now is flagged, so whoever claims it again drops it.
-- Returns how many messages were deleted and flagged, how many results were stored, and for
-- results kept elsewhere (store_revoked in backend.sql) the task ids asked for but those leased
-- now: deleted now, or by a first run of this statement whose reply was lost, or never queued
-- (Celery's workers also record a revoke of a task they do not know as REVOKED).
WITH gone AS (
    DELETE FROM {schema}.messages
    WHERE task_id = ANY(%(task_ids)s::text[]) AND (leased_by IS NULL OR visible_at <= now())
    RETURNING task_id
), flagged AS (
    UPDATE {schema}.messages SET revoked = true
    WHERE task_id = ANY(%(task_ids)s::text[]) AND leased_by IS NOT NULL AND visible_at > now()
    RETURNING task_id
), stored AS (
    INSERT INTO {schema}.results AS r (task_id, status, result, date_done, expires_at)
    SELECT DISTINCT task_id, 'REVOKED', %(revoked_result)s::jsonb, now(),
           now() + make_interval(secs => %(result_expires)s)
    FROM gone WHERE %(store_results)s
    ON CONFLICT (task_id) DO UPDATE SET status = 'REVOKED', result = excluded.result,
        date_done = excluded.date_done, expires_at = excluded.expires_at
    WHERE r.status NOT IN ('SUCCESS', 'FAILURE', 'REVOKED')
    RETURNING pg_notify(%(results_channel)s, r.task_id)  -- wakes whoever waits for it
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM flagged),
       (SELECT count(*) FROM stored),
       ARRAY(SELECT unnest(%(task_ids)s::text[]) EXCEPT SELECT task_id FROM flagged);

-- name: scheduled_list
-- Scheduled messages, soonest first, optionally of one queue.
SELECT id, queue, due_at, task_id, payload->'headers'->>'task', enqueued_at
FROM {schema}.messages
WHERE due_at IS NOT NULL AND (%(queue)s::text IS NULL OR queue = %(queue)s)
ORDER BY due_at, id LIMIT %(limit)s;

-- name: scheduled_task_ids
-- The task ids of scheduled messages, by message id.
SELECT DISTINCT task_id FROM {schema}.messages
WHERE id = ANY(%(ids)s::bigint[]) AND due_at IS NOT NULL;
