"""A throwaway PostgreSQL server for tests and demos.

Built on testing.postgresql, with three things it lacks: a predictable search
for the server binaries, running as root (initdb and postgres refuse to, so the
server runs as an unprivileged account), and no leftovers after Ctrl-C.

    with ThrowawayServer() as server:
        psycopg.connect(server.url)
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import os
import pathlib
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import urllib.parse
from collections.abc import Mapping

import psycopg

from flakectl.errors import FlakectlError

try:  # the lab extra (pip install 'flakectl[lab]'); the wrapper and `flakectl db` need none of it
    from testing.postgresql import Postgresql as _TestingPostgresql
except ImportError:
    _TestingPostgresql = None

#: Debian/Ubuntu install each major version side by side here.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
DEFAULT_SERVER_USER = "flakectl-pg"

# Durability buys nothing for a server whose files are deleted afterwards.
DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "listen_addresses": "127.0.0.1",
    "max_connections": "50",  # ~20 concurrent test connections, with headroom
    "shared_buffers": "128MB",
    "lc_messages": "C",
    "logging_collector": "off",
}


class ServerBinariesNotFound(FlakectlError):
    """The PostgreSQL server binaries (initdb, postgres) were not found."""


class ServerStartFailed(FlakectlError):
    """The throwaway PostgreSQL server could not be started."""


class LabNotInstalled(FlakectlError):
    """A throwaway PostgreSQL server (demo, bench, tests) needs testing.postgresql: pip install 'flakectl[lab]'"""


_HOW_TO_GET = (
    "Install them with `apt-get install postgresql` on Debian/Ubuntu, or set "
    "FLAKECTL_PG_BIN to a directory holding initdb and postgres."
)


def _has_binaries(directory: str) -> bool:
    return all(
        os.path.isfile(p) and os.access(p, os.X_OK)
        for p in (os.path.join(directory, "initdb"), os.path.join(directory, "postgres"))
    )


def _version_key(bin_dir: str) -> tuple[int, ...]:
    # "/usr/lib/postgresql/9.6/bin" < ".../15/bin": compare numbers, not text.
    name = pathlib.Path(bin_dir).parent.name
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (-1,)


def find_server_binaries(bin_dir: str | None = None) -> pathlib.Path:
    """The directory holding initdb and postgres.

    An explicit `bin_dir`, else $FLAKECTL_PG_BIN, is used as given: a wrong
    setting is an error rather than silently falling back to another version.
    """
    explicit = bin_dir or os.environ.get("FLAKECTL_PG_BIN")
    if explicit:
        if _has_binaries(explicit):
            return pathlib.Path(explicit)
        source = "bin_dir" if bin_dir else "FLAKECTL_PG_BIN"
        raise ServerBinariesNotFound(
            f"PostgreSQL server binaries not found: {source}={explicit!r} does not "
            f"contain executable initdb and postgres. {_HOW_TO_GET}"
        )

    path = os.environ.get("PATH", "")
    # Both from the same directory: a PATH mixing versions would fail in initdb.
    candidates = [d for d in path.split(os.pathsep) if d]
    candidates += sorted(glob.glob(DEBIAN_BIN_GLOB), key=_version_key, reverse=True)
    for directory in candidates:
        if _has_binaries(directory):
            return pathlib.Path(directory)
    raise ServerBinariesNotFound(
        "PostgreSQL server binaries (initdb and postgres) not found. Looked in: "
        f"$FLAKECTL_PG_BIN (not set); $PATH ({path!r}); {DEBIAN_BIN_GLOB} "
        f"(newest version first). {_HOW_TO_GET}"
    )


def _ensure_user(name: str) -> pwd.struct_passwd:
    """The unprivileged account the server runs as when we are root; created if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # Concurrent useradds were seen to both succeed, with different uids, one
    # overwriting the other's /etc/passwd entry: serialize them ourselves.
    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"
    with open(os.path.join(lock_dir, "flakectl-useradd.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(name)  # created while we waited
        except KeyError:
            pass
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        command = [useradd, "--system", "--user-group", "--no-create-home",
                   "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            error = done.stderr.strip() or f"exit {done.returncode}"
        except OSError as exc:
            error = str(exc)
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise ServerStartFailed(
        f"running as root, so PostgreSQL must run as an unprivileged user, but "
        f"user {name!r} could not be created ({error}). Create it yourself, set "
        f"FLAKECTL_PG_USER to an existing unprivileged user, or run as a normal user."
    )


def _searchable_by_all(directory: str) -> bool:
    path = pathlib.Path(directory).resolve()
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))


class _Postgresql(_TestingPostgresql or object):  # type: ignore[misc]
    """testing.postgresql, running the server as `run_as` (None: as ourselves)."""

    def __init__(self, *, bin_dir: pathlib.Path, run_as: pwd.struct_passwd | None,
                 settings: Mapping[str, str], **kwargs):
        self._run_as = run_as
        self._server_settings = dict(settings)
        super().__init__(initdb=str(bin_dir / "initdb"), postgres=str(bin_dir / "postgres"),
                         auto_start=0, **kwargs)

    def _as_server_user(self) -> dict:
        """Popen arguments that drop to the server user in the child itself.

        Unlike su/runuser, the Popen child *is* postgres, so our shutdown
        signal reaches the postmaster directly.
        """
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def _chown(self, path: str) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def initialize_database(self) -> None:
        self._chown(self.base_dir)
        for subdir in self.subdirectories:
            self._chown(os.path.join(self.base_dir, subdir))
        # C locale: identical sorting and messages on every machine.
        command = [self.initdb, "-D", self.get_data_directory(), "-U", "postgres",
                   "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        # run() kills initdb if we are interrupted, so nothing writes into a
        # directory that is being removed.
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.base_dir,
                              check=False, **self._as_server_user())
        if done.returncode != 0:
            raise ServerStartFailed(f"initdb failed (exit {done.returncode}):\n{done.stderr}")

    def get_server_commandline(self) -> list[str]:
        settings = {**self._server_settings,
                    "port": str(self.settings["port"]),
                    "unix_socket_directories": os.path.join(self.base_dir, "tmp")}
        command = [self.postgres, "-D", self.get_data_directory()]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def start(self) -> None:
        # Replaces testing.postgresql's start() to launch postgres as the server
        # user, and in its own session so a Ctrl-C aimed at us leaves the server
        # up until we shut it down in order.
        if self.child_process:
            return
        self.prestart()
        with open(os.path.join(self.base_dir, f"{self.name}.log"), "wt") as log:
            self.child_process = subprocess.Popen(
                self.get_server_commandline(), stdout=log, stderr=subprocess.STDOUT,
                cwd=self.base_dir, start_new_session=True, **self._as_server_user())
        self.wait_booting()
        self.poststart()

    def terminate(self, *args) -> None:
        # SIGINT is PostgreSQL's fast shutdown: it disconnects clients instead
        # of waiting for them. Unlike testing.postgresql, always reap the
        # process, even after a timeout or a Ctrl-C while waiting.
        proc = self.child_process
        if proc is None or self._owner_pid != os.getpid():
            return
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=self.DEFAULT_KILL_TIMEOUT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            self.child_process = None

    def is_server_available(self) -> bool:
        try:
            with psycopg.connect(self.url(database="template1"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def poststart(self) -> None:
        with psycopg.connect(self.url(database="postgres"), autocommit=True) as conn:
            if conn.execute("select 1 from pg_database where datname = 'test'").fetchone() is None:
                conn.execute("create database test")

    def cleanup(self) -> None:
        # We always own the base dir (see ThrowawayServer.start), so always
        # remove it; as root that works although the files are the server user's.
        if self.child_process is None and os.path.exists(self.base_dir):
            shutil.rmtree(self.base_dir, ignore_errors=True)


class ThrowawayServer:
    """A private PostgreSQL server, deleted with all its files on stop().

    Superuser `postgres`, trust authentication, database `test`, listening on
    127.0.0.1 and a unix socket in its base directory. `settings` add to or
    override DEFAULT_SETTINGS (passed as `postgres -c name=value`).
    """

    def __init__(self, *, settings: Mapping[str, str] | None = None,
                 bin_dir: str | None = None):
        if _TestingPostgresql is None:
            raise LabNotInstalled()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.bin_dir = find_server_binaries(bin_dir)
        self._pg: _Postgresql | None = None
        self.url = ""
        self.port = 0
        self.version = 0
        self.base_dir = ""
        self._owner_pid = os.getpid()

    def start(self) -> "ThrowawayServer":
        if self._pg is not None:
            return self
        run_as = None
        if os.geteuid() == 0:
            run_as = _ensure_user(os.environ.get("FLAKECTL_PG_USER") or DEFAULT_SERVER_USER)
        parent = tempfile.gettempdir()
        if run_as is not None and not _searchable_by_all(parent):
            parent = "/tmp"  # e.g. TMPDIR under /root: the server user could not reach it
        self.base_dir = tempfile.mkdtemp(prefix="flakectl-pg-", dir=parent)
        # BaseException: testing.postgresql only cleans up after Exception, and
        # a Ctrl-C during startup must not leave a server or directory behind.
        try:
            self._owner_pid = os.getpid()
            self._pg = _Postgresql(bin_dir=self.bin_dir, run_as=run_as,
                                   settings=self.settings, base_dir=self.base_dir)
            self._pg.setup()
            self._pg.start()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, RuntimeError):  # testing.postgresql's failures
                raise ServerStartFailed(str(exc)) from exc
            raise
        atexit.register(self.stop)
        self.port = self._pg.settings["port"]
        self.url = self.url_for("test")
        data_dir = pathlib.Path(self._pg.get_data_directory())
        self.version = int((data_dir / "PG_VERSION").read_text().split(".")[0])
        return self

    def url_for(self, dbname: str) -> str:
        """The libpq URL of database `dbname` on this server, as superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{urllib.parse.quote(dbname, safe='')}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, while running."""
        return self._pg.server_pid if self._pg is not None else None

    def stop(self) -> None:
        """Shut the server down (fast shutdown) and delete its files; idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child exiting must not delete its parent's server
        atexit.unregister(self.stop)
        pg, self._pg = self._pg, None
        try:
            if pg is not None:
                pg.stop()
        finally:
            if self.base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ThrowawayServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


__all__ = [
    "DEFAULT_SETTINGS",
    "ServerBinariesNotFound",
    "ServerStartFailed",
    "ThrowawayServer",
    "find_server_binaries",
]
