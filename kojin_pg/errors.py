"""Exceptions raised by kojin_pg. Every error the library raises derives from :class:`KojinError`."""

from __future__ import annotations


class KojinError(Exception):
    """kojin_pg failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(KojinError, ValueError):
    """The URL or an option is invalid."""


class SchemaError(KojinError):
    """The database schema is missing, outdated or newer than this version of kojin_pg."""


class PayloadError(KojinError, ValueError):
    """A value cannot be stored: it cannot be serialized, or it is too large."""


class DatabaseUnavailable(KojinError, ConnectionError):
    """PostgreSQL could not be reached within the retry budget."""
