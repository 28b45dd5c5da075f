-- The outbox announces a message at the caller's commit, and only if a consumer of its queue
-- may be idle (see kojin_pg/transport/idle.py). Deciding when the message is written would hold
-- the queue's publishing lock for the caller's whole transaction, and every consumer going idle,
-- and every publisher behind it, would wait for that transaction. So the outbox's publish also
-- writes one row here, and a deferred trigger, run by the commit, removes it and does what a
-- publish does in its statement: the shared publishing lock (held to the commit, now moments
-- away), the idle probe, and the NOTIFY if it fails. A rolled-back send leaves nothing. The rows
-- live only inside the sending transaction, so the table is unlogged (no WAL). (A caller that
-- runs SET CONSTRAINTS ALL IMMEDIATE after a send makes the trigger run then, and the lock is
-- held from then until its commit.)
CREATE UNLOGGED TABLE {schema}.outbox_wakeups (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text NOT NULL,
    channel          text NOT NULL,
    idle_space       int NOT NULL,
    publishing_space int NOT NULL,
    queue_key        int NOT NULL
);

CREATE FUNCTION {schema}.wake_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {schema}.outbox_wakeups WHERE id = NEW.id;
    PERFORM pg_advisory_xact_lock_shared(NEW.publishing_space, NEW.queue_key);
    -- the probe in one expression: a cancel between the try and the unlock of two statements
    -- would leave the idle key held by the caller's session, and consumers waiting on it
    PERFORM pg_notify(NEW.channel, NEW.queue)
    WHERE CASE WHEN pg_try_advisory_lock(NEW.idle_space, NEW.queue_key)
               THEN NOT pg_advisory_unlock(NEW.idle_space, NEW.queue_key)
               ELSE true END;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER wake_at_commit AFTER INSERT ON {schema}.outbox_wakeups
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.wake_at_commit();
