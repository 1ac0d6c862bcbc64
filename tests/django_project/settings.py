"""Django settings for the test project, built from the test servers' URLs.

Django is configured once per process (`configure`). Which driver Django's
PostgreSQL backend uses is decided when the backend is first imported: it
prefers psycopg 3 when it is installed. The worker has only psycopg2, so
`configure(driver="psycopg2")` hides psycopg 3 while the backend is imported;
the backend then keeps psycopg2 for the life of the process.
"""

from __future__ import annotations

import sys
import urllib.parse

DRIVERS = ("psycopg2", "psycopg")


def database(url: str) -> dict:
    """A DATABASES entry for a libpq URL (postgresql://user@host:port/name)."""
    parts = urllib.parse.urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": urllib.parse.unquote(parts.path.lstrip("/")),
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "CONN_MAX_AGE": 0,
    }


def configure(main_url: str, runs_url: str, *, driver: str) -> None:
    """Settings for both databases; Django set up with `driver` under its backend."""
    import django
    from django.conf import settings

    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
    if settings.configured:  # once per process; each test aims the aliases (point_at)
        _check_driver(driver)
        return
    settings.configure(
        DATABASES={"default": database(main_url), "ta_timeseries": database(runs_url)},
        DATABASE_ROUTERS=["django_project.router.MultiDatabaseRouter"],
        INSTALLED_APPS=["django_project.reports", "django_project.ta_timeseries"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
        TIME_ZONE="UTC",
    )
    hidden = sys.modules.get("psycopg", ...)
    if driver == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment] # `import psycopg` fails
    try:
        import django.db.backends.postgresql.base  # noqa: F401 - binds the driver
    finally:
        if hidden is ...:
            sys.modules.pop("psycopg", None)
        else:
            sys.modules["psycopg"] = hidden
    django.setup()
    _check_driver(driver)


def _check_driver(driver: str) -> None:
    from django.db import connections

    used = connections["default"].Database.__name__
    if used != driver:
        raise RuntimeError(f"Django's backend uses {used}, expected {driver}")


def point_at(main_url: str, runs_url: str) -> None:
    """Aim both aliases at other databases (a test's own); the next query reconnects."""
    from django.db import connections

    for alias, url in (("default", main_url), ("ta_timeseries", runs_url)):
        connection = connections[alias]
        connection.close()
        connection.settings_dict.update(database(url))
