"""kojin_pg: PostgreSQL as the whole Celery stack (result backend and kombu broker).

Result backend::

    app.conf.result_backend = "kojin+postgresql://user:password@host/dbname"

See the README for the broker, options and operations.
"""

from __future__ import annotations

from .config import Settings, parse
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    KojinError,
    PayloadError,
    SchemaError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "KojinError",
    "PayloadError",
    "SchemaError",
    "Settings",
    "__version__",
    "parse",
]


def _register_kombu_alias() -> None:
    # kombu resolves URL schemes only through TRANSPORT_ALIASES. Connection() splits
    # "kojin+postgresql://..." at the "+" and looks up "kojin"; Connection.switch() to the next
    # URL of a failover list ("url1;url2") looks up the whole scheme, "kojin+postgresql".
    from kombu.transport import TRANSPORT_ALIASES

    for alias in ("kojin", "kojin+postgresql", "kojin+postgres"):
        TRANSPORT_ALIASES.setdefault(alias, "kojin_pg.transport:Transport")


_register_kombu_alias()
