-- Queries of the Django admin pages (kojin_pg.contrib.django).

-- name: distinct_values
-- The distinct non-NULL values of an indexed column, in order, read by walking its index one
-- value at a time (a loose index scan): the cost grows with the number of distinct values, not
-- with the rows, so a filter's choices stay cheap on a results table of millions of rows.
WITH RECURSIVE walk(value) AS (
    (SELECT {column} FROM {schema}.{table} WHERE {column} IS NOT NULL ORDER BY {column} LIMIT 1)
    UNION ALL
    SELECT (SELECT t.{column} FROM {schema}.{table} t WHERE t.{column} > w.value
            ORDER BY t.{column} LIMIT 1)
    FROM walk w WHERE w.value IS NOT NULL
)
SELECT value FROM walk WHERE value IS NOT NULL LIMIT %(limit)s;

-- name: estimated_rows
-- The planner's estimate of a table's rows (from the last ANALYZE), -1 if never analyzed.
SELECT reltuples::bigint FROM pg_class WHERE oid = %(table)s::regclass;
