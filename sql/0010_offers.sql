-- Hand-off at publish (kojin_pg/transport/offers.py): a consumer with nothing left to claim and
-- a free prefetch slot offers that slot here; a publish to one of its queues takes the offer
-- (clearing its token), leases its message to the consumer in the same statement and sends the
-- message itself on the consumer's own NOTIFY channel, so the consumer delivers it without a
-- claim's round trip, as a blocked BRPOP would. An offer is good only while its consumer's
-- LISTEN session holds the advisory lock (offer space, live_key): a publish skips the others.
--
-- One row per consuming channel of a process (slot), made once and then only updated: the
-- token changes with every offer and every take, and no index covers it, so each update stays
-- on its page (HOT) and the table stays as small as the number of consumers, however many
-- messages pass. Who removes a row: its consumer when it closes or listens on a new session,
-- the sweep (rows whose lock nobody holds: the consumer is gone), and PostgreSQL's crash
-- recovery (unlogged: an offer lives no longer than its session anyway, and writing one costs
-- no WAL).
CREATE UNLOGGED TABLE {schema}.offers (
    slot           uuid PRIMARY KEY,
    token          uuid,  -- the open offer; NULL: taken, withdrawn or not made yet
    consumer       text NOT NULL,
    queues         text[] NOT NULL,
    notify_channel text NOT NULL,
    lease          interval NOT NULL,
    live_key       int NOT NULL
) WITH (fillfactor = 50);
CREATE INDEX offers_consumer_idx ON {schema}.offers (consumer);
