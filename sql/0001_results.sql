-- kojin_pg result backend: task results, saved groups and native chord counters.
-- {schema} is replaced by the quoted schema name when the migrator applies this file.

CREATE TABLE {schema}.results (
    task_id      text PRIMARY KEY,
    status       text NOT NULL,
    -- the JSON result serializer (Celery's default) stores the result as real JSONB;
    -- any other serializer stores the whole encoded meta in result_bytes instead.
    result       jsonb,
    result_bytes bytea,
    traceback    text,
    children     jsonb,
    group_id     text,
    parent_id    text,
    -- result_extended metadata
    name         text,
    args         jsonb,
    kwargs       jsonb,
    worker       text,
    retries      integer,
    queue        text,
    date_done    timestamptz,
    expires_at   timestamptz
);
CREATE INDEX results_expires_at_idx ON {schema}.results (expires_at) WHERE expires_at IS NOT NULL;
-- results churn: vacuum early so dead rows stay bounded under sustained load.
ALTER TABLE {schema}.results SET (autovacuum_vacuum_scale_factor = 0.02,
                                  autovacuum_vacuum_insert_scale_factor = 0.05,
                                  autovacuum_analyze_scale_factor = 0.05);

CREATE TABLE {schema}.groups (
    group_id     text PRIMARY KEY,
    result       jsonb,
    result_bytes bytea,
    date_done    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz
);
CREATE INDEX groups_expires_at_idx ON {schema}.groups (expires_at) WHERE expires_at IS NOT NULL;

-- One row per chord: the counter that decides, atomically, which header task fires the body.
CREATE TABLE {schema}.chords (
    group_id     text PRIMARY KEY,
    chord_size   integer,                     -- NULL until set_chord_size
    extra        integer NOT NULL DEFAULT 0,  -- add_to_chord (Task.replace in a header)
    header_ids   text[],                      -- header task ids in header order, when known
    completed    integer NOT NULL DEFAULT 0,  -- distinct header parts reported
    claim_token  text,                        -- who is firing the body ...
    claim_until  timestamptz,                 -- ... until when (then another may take over)
    fired        boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz
);
CREATE INDEX chords_expires_at_idx ON {schema}.chords (expires_at) WHERE expires_at IS NOT NULL;

-- One row per reported header part: the primary key makes counting exactly-once, so a
-- redelivered header task that reports twice counts once.
CREATE TABLE {schema}.chord_parts (
    group_id     text NOT NULL,
    task_id      text NOT NULL,
    idx          integer NOT NULL,            -- position in the header (group_index)
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    status       text NOT NULL,
    result       jsonb,
    result_bytes bytea,
    expires_at   timestamptz,
    PRIMARY KEY (group_id, task_id, idx)
);
CREATE INDEX chord_parts_expires_at_idx ON {schema}.chord_parts (expires_at)
    WHERE expires_at IS NOT NULL;
