-- Waiting for a result takes its wait slot and reads it in one round trip (see
-- kojin_pg/backend/waiters.py). A VOLATILE PL/pgSQL function runs each of its statements with a
-- snapshot of its own, so the read sees everything committed before the slot was taken: what a
-- writer stored without announcing (it found the slot free) is read here.
CREATE FUNCTION {schema}.take_wait_slots_and_read(
    p_space int, p_take int[], p_release int[], p_task_id text)
RETURNS SETOF {schema}.results
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_unlock_shared(p_space, slot) FROM unnest(p_release) AS slot;
    PERFORM pg_advisory_lock_shared(p_space, slot) FROM unnest(p_take) AS slot;
    RETURN QUERY SELECT * FROM {schema}.results r
        WHERE r.task_id = p_task_id AND (r.expires_at IS NULL OR r.expires_at > now());
END
$$;
