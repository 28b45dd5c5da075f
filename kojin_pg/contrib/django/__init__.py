"""kojin_pg in the Django admin: results, queues, dead letters and scheduled messages.

An optional Django app (``pip install 'kojin-pg[django]'``) with read-only, unmanaged models over
kojin_pg's tables; it ships no Django migrations, the tables belong to ``kojin-pg migrate``.

Settings::

    INSTALLED_APPS = [..., "django.contrib.admin", "kojin_pg.contrib.django"]
    KOJIN_PG_SCHEMA = "kojin"        # kojin_pg's ``schema`` option (default "kojin")
    KOJIN_PG_DATABASE = "default"    # the DATABASES alias of the database holding that schema
    DATABASE_ROUTERS = ["kojin_pg.contrib.django.routers.KojinPgRouter"]

The router sends every query of these models to ``KOJIN_PG_DATABASE``; it is only needed when
that is not ``"default"``.
"""
