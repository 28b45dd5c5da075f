"""URL and option parsing: clear errors that never leak the password."""

from __future__ import annotations

import pytest

from kojin_pg import config
from kojin_pg.errors import ConfigurationError

URL = "postgresql://alice:s3cr3t-pw@db.example:5433/app"


def test_defaults_and_libpq_passthrough():
    s = config.parse(URL + "?sslmode=require&schema=jobs&pool_max_size=4")
    assert s.schema == "jobs"
    assert s.pool_max_size == 4
    assert "sslmode=require" in s.conninfo
    assert "schema" not in s.conninfo


def test_options_mapping_overrides_url():
    s = config.parse(URL + "?visibility_timeout=10", {"visibility_timeout": 20, "use_notify": "off"})
    assert s.visibility_timeout == 20.0
    assert s.use_notify is False


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "kojin+postgresql", "kojin"])
def test_schemes(scheme):
    assert config.parse(URL.replace("postgresql", scheme, 1)).schema == "kojin"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        (URL + "?bogus=1", {}, "unknown option 'bogus'"),
        (URL, {"bogus": 1}, "unknown option 'bogus'"),
        (URL, {"visibility_timeout": -1}, "'visibility_timeout' must be greater than 0"),
        (URL, {"max_deliveries": 0}, "'max_deliveries' must be greater than 0"),
        (URL, {"pool_max_size": "many"}, "invalid value 'many' for option 'pool_max_size'"),
        (URL, {"use_notify": "perhaps"}, "option 'use_notify'"),
        (URL, {"schema": 'x"; DROP TABLE results; --'}, "invalid schema name"),
        (URL, {"schema": "Upper"}, "invalid schema name"),
        ("mysql://alice:s3cr3t-pw@h/db", {}, "unsupported URL scheme 'mysql'"),
        ("postgresql://alice:s3cr3t-pw@h:notaport/db", {}, "malformed URL"),
        ("not a url", {}, "not a PostgreSQL URL"),
    ],
)
def test_bad_input_is_named_and_password_hidden(url, options, message):
    with pytest.raises(ConfigurationError) as info:
        config.parse(url, options)
    assert message in str(info.value)
    assert "s3cr3t-pw" not in str(info.value)


def test_password_never_in_repr():
    s = config.parse(URL + "&password=other-secret".replace("&", "?"))
    assert "s3cr3t-pw" not in repr(s)
    assert "other-secret" not in repr(s)
    assert "****" in s.safe_url


def test_mask_url():
    assert config.mask_url(URL) == "postgresql://alice:****@db.example:5433/app"
    assert config.mask_url("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.parametrize("name", ["", "a" * 41, "1abc", "a-b", "a b", "a;b", "ÄÖ"])
def test_identifier_validation(name):
    with pytest.raises(ConfigurationError):
        config.validate_identifier(name)


def test_scrub_masks_the_password_in_any_text():
    assert config.scrub("failed for s3cr3t-pw at host", URL) == "failed for **** at host"
    assert config.scrub("nothing to hide", "postgresql://h/db") == "nothing to hide"
