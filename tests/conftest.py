"""Real PostgreSQL for the tests: one throwaway server per session, one
template database migrated once, a fresh copy for every test that asks."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, settings

from flakectl.dba import migrate
from flakectl.lab.pgserver import ThrowawayServer

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FLAKECTL_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=int(os.environ.get("FLAKECTL_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEMPLATE = "flakectl_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def server() -> Iterator[ThrowawayServer]:
    with ThrowawayServer() as srv:
        yield srv


def create_database(server: ThrowawayServer, name: str, template: str | None = None) -> str:
    with psycopg.connect(server.url, autocommit=True) as admin:
        clause = f" template {template}" if template else ""
        admin.execute(f'create database "{name}"{clause}')
    return server.url_for(name)


def drop_database(server: ThrowawayServer, name: str) -> None:
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def template_url(server: ThrowawayServer) -> str:
    url = create_database(server, TEMPLATE)
    migrate.upgrade(url)
    return url


@pytest.fixture
def db_url(server: ThrowawayServer, template_url: str) -> Iterator[str]:
    """A migrated database of this test's own."""
    name = f"t{os.getpid()}_{next(_names)}"
    url = create_database(server, name, TEMPLATE)
    yield url
    drop_database(server, name)


@pytest.fixture
def empty_db_url(server: ThrowawayServer) -> Iterator[str]:
    """A database with nothing installed."""
    name = f"e{os.getpid()}_{next(_names)}"
    yield create_database(server, name)
    drop_database(server, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url) as c:
        yield c


@pytest.fixture(scope="session")
def shared_url(server: ThrowawayServer, template_url: str) -> str:
    """One migrated database for tests that roll back everything they do."""
    return create_database(server, f"shared{os.getpid()}", TEMPLATE)
