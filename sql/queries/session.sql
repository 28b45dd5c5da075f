-- Statements about the server and the session itself, naming no table of the schema.

-- name: what_the_server_tells
-- Run once on a process's first connection to a database. The backend pid: a pooler gives the
-- client a pid of its own making at start-up, which differs (db/session.py, ServerFacts).
-- Whether this role may write a logical-decoding message: an announced store or publish
-- writes one to wait for its flush (sql/0013). PUBLIC may by default; a hardened server may
-- revoke it, and then the write and its announcement commit together, durably.
SELECT pg_backend_pid(),
       coalesce(bool_and(has_function_privilege(p.oid, 'EXECUTE')), false)
FROM pg_catalog.pg_proc p
WHERE p.proname = 'pg_logical_emit_message'
  AND p.pronamespace = 'pg_catalog'::regnamespace
  AND p.proargtypes[2] = 'pg_catalog.text'::regtype
