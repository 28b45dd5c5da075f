"""Development aids, kept apart from the runtime path: the zero-setup embedded PostgreSQL
(:mod:`kojin_pg.dev.embedded`, used by ``kojin-pg demo`` and the tests) and the demo itself
(:mod:`kojin_pg.dev.demo`). Nothing in the broker or the result backend imports them.
"""
