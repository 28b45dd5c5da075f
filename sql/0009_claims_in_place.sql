-- A claim, a lease renewal and a hand-back change only columns no index reads (visible_at,
-- leased_by, delivery_count), so PostgreSQL can update the row in place (a HOT update: no new
-- entry in any of the table's indexes, and a WAL record of the changed bytes only) when the
-- row's page has room for the new version.
--
-- Two things stood in the way. messages_claim_idx carried visible_at as an INCLUDE column, and
-- a claim changes it: every claim added an entry to every index of the table. The column bought
-- nothing: a locking claim (FOR UPDATE) reads the row anyway and checks visible_at there (the
-- plan's Filter, not its Index Cond). And publishes filled pages to the brim, so the new
-- version found no room on its page. New pages now keep a third free (fillfactor 65): the
-- table takes a tenth to a fifth more pages, and most claims write no index entry at all.
--
-- The index is rebuilt under a SHARE lock on messages (publishes wait while it builds, claims
-- do not). An operator with a large backlog builds messages_ready_idx beforehand with CREATE
-- INDEX CONCURRENTLY (README, "Upgrading to migration 9"), and only the swap is left here; a
-- concurrent build that failed leaves an invalid index, which is built again.
ALTER TABLE {schema}.messages SET (fillfactor = 65);
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_index
               WHERE indexrelid = to_regclass('{schema}.messages_ready_idx') AND NOT indisvalid)
    THEN
        DROP INDEX {schema}.messages_ready_idx;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS messages_ready_idx ON {schema}.messages (queue, priority DESC, id)
    WHERE due_at IS NULL;
DROP INDEX {schema}.messages_claim_idx;
ALTER INDEX {schema}.messages_ready_idx RENAME TO messages_claim_idx;
