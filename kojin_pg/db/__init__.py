"""The database layer: pooled connections with retries, LISTEN connections, the SQL files
shipped with the package, and the migrator. Everything above talks to PostgreSQL through here.
"""

from __future__ import annotations

from .forksafe import ProcessLocal
from .listener import Listener
from .pool import Database, is_transient
from .session import configure_connection
from .sqlfiles import Queries

__all__ = ["Database", "Listener", "ProcessLocal", "Queries", "configure_connection", "is_transient"]
