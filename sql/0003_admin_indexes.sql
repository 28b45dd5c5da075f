-- Indexes for listing results newest first, all of them or of one status or task name (the
-- Django admin's results page, and operator queries of the same shape).
-- Built inside the migration's transaction: on a large results table this blocks result writes
-- while they build. To avoid that, create them beforehand with CREATE INDEX CONCURRENTLY under
-- these names; IF NOT EXISTS then makes this migration instant.
CREATE INDEX IF NOT EXISTS results_date_done_idx ON {schema}.results (date_done);
CREATE INDEX IF NOT EXISTS results_status_date_done_idx ON {schema}.results (status, date_done);
CREATE INDEX IF NOT EXISTS results_name_date_done_idx ON {schema}.results (name, date_done);
