-- What a deployment needs to age well: queues that expire as on RabbitMQ, message expiry,
-- publishes that a retry cannot insert twice, and chord extras counted once.

-- A publish carries an id made by the client; a retry after a lost commit reply inserts nothing.
ALTER TABLE {schema}.messages ADD COLUMN publish_id uuid;
CREATE UNIQUE INDEX messages_publish_id_idx ON {schema}.messages (publish_id);
-- per-message expiration and the queue's message TTL: never delivered after, swept soon after
ALTER TABLE {schema}.messages ADD COLUMN expires_at timestamptz;
CREATE INDEX messages_expires_at_idx ON {schema}.messages (expires_at)
    WHERE expires_at IS NOT NULL;

-- Declared queues with their RabbitMQ arguments. A queue deleted because it expired or lost
-- its last consumer stays here as a tombstone (deleted_at) for a while, so publishers still
-- routing to it from a cached binding table add nothing to it; declaring it again revives it.
CREATE TABLE {schema}.queues (
    name          text PRIMARY KEY,
    message_ttl   interval,                        -- x-message-ttl
    expires       interval,                        -- x-expires: deleted after this long unused
    auto_delete   boolean NOT NULL DEFAULT false,  -- deleted when its last consumer leaves
    had_consumer  boolean NOT NULL DEFAULT false,
    last_used     timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);

-- Who consumes each queue, across processes: each live consumer refreshes seen_at; a crashed
-- one stops, and the sweep forgets it after a grace period.
CREATE TABLE {schema}.consumers (
    queue     text NOT NULL,
    consumer  text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, consumer)
);
CREATE INDEX consumers_consumer_idx ON {schema}.consumers (consumer);

-- add_to_chord is keyed by the task it adds, so a retried call counts once.
ALTER TABLE {schema}.chords ADD COLUMN extra_ids text[] NOT NULL DEFAULT '{{}}';
