-- kojin_pg broker: one messages table for every queue, dead letters, and exchange bindings.

CREATE TABLE {schema}.messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue          text NOT NULL,
    priority       smallint NOT NULL DEFAULT 0,    -- higher is delivered first
    payload        jsonb NOT NULL,                 -- the kombu message (body, headers, properties)
    -- both the lease expiry of a claimed message and the delay of a new one (SQS/pgmq model)
    visible_at     timestamptz NOT NULL DEFAULT now(),
    delivery_count integer NOT NULL DEFAULT 0,
    leased_by      text,
    enqueued_at    timestamptz NOT NULL DEFAULT now()
);
-- the claim query walks this index in delivery order and checks visibility from the index
CREATE INDEX messages_claim_idx ON {schema}.messages (queue, priority DESC, id) INCLUDE (visible_at);
-- rows are deleted on ack: keep dead tuples from piling up under sustained load
ALTER TABLE {schema}.messages SET (autovacuum_vacuum_scale_factor = 0.01,
                                   autovacuum_vacuum_threshold = 1000,
                                   autovacuum_vacuum_insert_scale_factor = 0.02,
                                   autovacuum_vacuum_cost_delay = 0);

CREATE TABLE {schema}.dead_letters (
    id             bigint PRIMARY KEY,              -- the id the message had in messages
    queue          text NOT NULL,
    priority       smallint NOT NULL DEFAULT 0,
    payload        jsonb NOT NULL,
    delivery_count integer NOT NULL,
    reason         text NOT NULL,                   -- max_deliveries | rejected
    error          text,
    enqueued_at    timestamptz NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_queue_idx ON {schema}.dead_letters (queue, id);

-- Exchange bindings shared by every process: routing, fanout (remote control) and topics (events).
CREATE TABLE {schema}.bindings (
    exchange       text NOT NULL,
    routing_key    text NOT NULL,
    pattern        text NOT NULL DEFAULT '',
    queue          text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, queue, routing_key)
);
CREATE INDEX bindings_queue_idx ON {schema}.bindings (queue);
