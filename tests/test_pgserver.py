"""The throwaway server helper, against real PostgreSQL servers (no mocks)."""

from __future__ import annotations

import os
import pathlib
import pwd

import psycopg
import pytest

from flakectl.lab import pgserver
from flakectl.errors import FlakectlError
from flakectl.lab.pgserver import ServerBinariesNotFound, ThrowawayServer, find_server_binaries


@pytest.fixture(scope="module")
def server():
    with ThrowawayServer() as srv:
        yield srv


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_answers_a_query(server):
    with psycopg.connect(server.url) as conn:
        user, version = conn.execute("select current_user, version()").fetchone()
        dbname = conn.execute("select current_database()").fetchone()[0]
    assert user == "postgres"
    assert version.startswith(f"PostgreSQL {server.version}")
    assert dbname == "test"
    assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/test"


def test_settings_for_tests(server):
    with psycopg.connect(server.url_for("postgres")) as conn:
        show = {name: conn.execute(f"show {name}").fetchone()[0]
                for name in ("fsync", "synchronous_commit", "full_page_writes",
                             "listen_addresses", "max_connections", "lc_messages",
                             "unix_socket_directories")}
    assert show["fsync"] == show["synchronous_commit"] == show["full_page_writes"] == "off"
    assert show["listen_addresses"] == "127.0.0.1"
    assert int(show["max_connections"]) >= 20
    assert show["lc_messages"] == "C"
    assert show["unix_socket_directories"].startswith(server.base_dir)


def test_twenty_concurrent_connections(server):
    conns = [psycopg.connect(server.url) for _ in range(20)]
    try:
        assert all(c.execute("select 1").fetchone() == (1,) for c in conns)
    finally:
        for c in conns:
            c.close()


def test_stop_removes_files_and_process_and_is_idempotent():
    srv = ThrowawayServer(settings={"work_mem": "8MB"})
    with srv:
        pid, base_dir = srv.pid, srv.base_dir
        assert pid is not None and _process_exists(pid)
        assert pathlib.Path(base_dir, "data", "PG_VERSION").exists()
        with psycopg.connect(srv.url) as conn:
            assert conn.execute("show work_mem").fetchone()[0] == "8MB"
    assert not _process_exists(pid)
    assert not os.path.exists(base_dir)
    srv.stop()  # again: no error


def test_exception_in_block_stops_server():
    with pytest.raises(KeyboardInterrupt):
        with ThrowawayServer() as srv:
            pid, base_dir = srv.pid, srv.base_dir
            raise KeyboardInterrupt
    assert not _process_exists(pid)
    assert not os.path.exists(base_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to a server user")
def test_as_root_server_runs_as_unprivileged_user(server):
    expected = pwd.getpwnam(os.environ.get("FLAKECTL_PG_USER") or pgserver.DEFAULT_SERVER_USER)
    status = pathlib.Path(f"/proc/{server.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [str(expected.pw_uid)] * 4  # real, effective, saved, filesystem
    assert expected.pw_uid != 0
    assert pathlib.Path(server.base_dir, "data").stat().st_uid == expected.pw_uid


def test_pg_bin_override_picks_that_directory(monkeypatch):
    real = find_server_binaries()
    monkeypatch.setenv("FLAKECTL_PG_BIN", str(real))
    monkeypatch.setenv("PATH", "")
    assert find_server_binaries() == real


def test_bogus_pg_bin_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAKECTL_PG_BIN", str(tmp_path))
    with pytest.raises(ServerBinariesNotFound) as info:
        ThrowawayServer()
    message = str(info.value)
    assert isinstance(info.value, FlakectlError)
    assert f"FLAKECTL_PG_BIN={str(tmp_path)!r}" in message
    assert "apt-get install postgresql" in message


def test_nothing_found_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("FLAKECTL_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pgserver, "DEBIAN_BIN_GLOB", str(tmp_path / "nothing" / "*" / "bin"))
    with pytest.raises(ServerBinariesNotFound) as info:
        find_server_binaries()
    message = str(info.value)
    assert str(tmp_path) in message  # the PATH searched
    assert "FLAKECTL_PG_BIN" in message and "apt-get install postgresql" in message


def test_newest_debian_version_first(monkeypatch, tmp_path):
    for version in ("9.6", "15", "10"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        for name in ("initdb", "postgres"):
            (bin_dir / name).touch(mode=0o755)
    monkeypatch.delenv("FLAKECTL_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(pgserver, "DEBIAN_BIN_GLOB", str(tmp_path / "*" / "bin"))
    assert find_server_binaries() == tmp_path / "15" / "bin"


def test_failed_start_says_why_and_leaves_nothing_behind():
    srv = ThrowawayServer(settings={"no_such_setting": "1"})
    with pytest.raises(pgserver.ServerStartFailed, match="no_such_setting"):
        srv.start()
    assert srv.base_dir and not os.path.exists(srv.base_dir)
    assert srv.pid is None
