-- The broker knows each task: when it is due, which task it is, and whether it is unique.

-- A scheduled message (Celery ETA/countdown) has due_at set, and visible_at = due_at: it is not
-- delivered before. The claim reads ready messages through a partial index that has no
-- scheduled row in it, and due ones through messages_due_idx, so a million messages scheduled
-- for later cost a claim nothing.
ALTER TABLE {schema}.messages ADD COLUMN due_at timestamptz;
-- Celery's task id (headers.id): revoke finds a queued or scheduled task by it.
ALTER TABLE {schema}.messages ADD COLUMN task_id text;
-- Opt-in deduplication: a second publish of the same key into the queue is a no-op while the
-- first is queued or scheduled (the claim clears the key).
ALTER TABLE {schema}.messages ADD COLUMN unique_key text;
-- Revoked while leased: whoever claims it next drops it instead of running it.
ALTER TABLE {schema}.messages ADD COLUMN revoked boolean NOT NULL DEFAULT false;

DROP INDEX {schema}.messages_claim_idx;
CREATE INDEX messages_claim_idx ON {schema}.messages (queue, priority DESC, id) INCLUDE (visible_at)
    WHERE due_at IS NULL;
CREATE INDEX messages_due_idx ON {schema}.messages (queue, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX messages_task_id_idx ON {schema}.messages (task_id) WHERE task_id IS NOT NULL;
CREATE UNIQUE INDEX messages_unique_key_idx ON {schema}.messages (queue, unique_key)
    WHERE unique_key IS NOT NULL;
