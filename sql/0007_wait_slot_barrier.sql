-- Waiting for a result takes its wait slot, waits for the stores in flight on that slot to
-- commit, and reads it, in one round trip (see kojin_pg/backend/waiters.py). Writers no longer
-- hold the wait slot until their commit (so they do not take each other for waiters); they hold
-- a shared lock on the slot's writing key, and this barrier waits for it. A VOLATILE PL/pgSQL
-- function runs each of its statements with a snapshot of its own (in READ COMMITTED, which the
-- LISTEN session sets), so the read sees everything committed before the barrier: what a writer
-- stored without announcing is read here.
-- (Migration 6's function, without the barrier, stays for processes of the older version.)
CREATE FUNCTION {schema}.take_wait_slots_and_read(
    p_space int, p_writing_space int, p_take int[], p_release int[], p_task_id text)
RETURNS SETOF {schema}.results
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    slot int;
BEGIN
    PERFORM pg_advisory_unlock_shared(p_space, s) FROM unnest(p_release) AS s;
    FOREACH slot IN ARRAY p_take LOOP
        -- one statement: a cancel between the barrier's lock and unlock would leave it held
        PERFORM pg_advisory_lock_shared(p_space, slot), pg_advisory_lock(p_writing_space, slot),
                pg_advisory_unlock(p_writing_space, slot);
    END LOOP;
    RETURN QUERY SELECT * FROM {schema}.results r
        WHERE r.task_id = p_task_id AND (r.expires_at IS NULL OR r.expires_at > now());
END
$$;
