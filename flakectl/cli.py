"""The `flakectl` command: DBA maintenance, verification against the
reference, and a demo on a throwaway server.

    flakectl db upgrade|downgrade|current|sql     install and inspect the schema
    flakectl process --repo ID --commit SHA       run the function, print its row
    flakectl verify --repo ID --commit SHA        function vs. reference, rolled back
    flakectl status [--repo ID]                   what is installed, what the tables hold
    flakectl prune --older-than 30d               forget old ledger rows
    flakectl demo                                 the whole thing on a throwaway server
    flakectl bench                                the function vs the worker's path, timed

Every option also reads an environment variable, named in --help (flags
given on the command line win). Data goes to stdout, diagnostics to stderr. A
user mistake prints one line `flakectl: error: ...` and exits 1 (2 for a
wrong command line); `verify` exits 1 when the function and the reference
differ, `bench` when the function and the worker's path leave different states.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta

from flakectl import api, reference
from flakectl.dba import dbadmin, ledger, migrate
from flakectl.dba.connection import ENV_URL, connect
from flakectl.dba.durations import EXAMPLES, format_duration, parse_duration
from flakectl.errors import (
    FlakectlError,
    InvalidArgument,
    LockNotAvailable,
    NotInstalled,
    WrongIsolationLevel,
    wrap_exceptions,
)
from flakectl.model import Summary

PROG = "flakectl"
ENV_PREFIX = "FLAKECTL_"


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


# --------------------------------------------------------------------------
# Options that also read an environment variable
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _EnvOption:
    dest: str
    env: str
    flag: str
    convert: Callable[[str], object]
    default: object
    required: bool
    group: str | None  # options of one group exclude each other


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(_env_options=[])

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _env_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def _option(parser: argparse.ArgumentParser, flag: str, *, help: str, type: Callable = str,  # noqa: A002
            default: object = None, required: bool = False, switch: bool = False,
            env: str | None = None, group: str | None = None, target=None,  # noqa: ANN001
            dest: str | None = None, **kwargs) -> None:
    """Add `flag`, reading $FLAKECTL_<NAME> when the flag is not given."""
    name = flag.lstrip("-").replace("-", "_")
    dest = dest or name
    env = env or ENV_PREFIX + name.upper()
    shown = f"env: {env}"
    if default is not None and not switch:
        shown += f"; default: {format_duration(default) if isinstance(default, timedelta) else default}"
    if required:
        shown += "; required"
    target = target or parser
    if switch:
        target.add_argument(flag, action="store_const", const=True, default=None, dest=dest,
                            help=f"{help} ({shown})", **kwargs)
    else:
        target.add_argument(flag, type=type, default=None, dest=dest, help=f"{help} ({shown})", **kwargs)
    parser.get_default("_env_options").append(
        _EnvOption(dest, env, flag, _env_bool if switch else type,
                   False if switch and default is None else default, required, group))


def _apply_env(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from the environment, then defaults."""
    options: list[_EnvOption] = getattr(args, "_env_options", [])
    given_groups = {o.group for o in options if o.group and getattr(args, o.dest) is not None}
    for option in options:
        if getattr(args, option.dest) is not None:
            continue
        text = os.environ.get(option.env)
        if text is not None and text != "" and option.group not in given_groups:
            try:
                value = option.convert(text)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"{option.env}={text!r} (for {option.flag}): {exc}") from None
            setattr(args, option.dest, value)
        elif option.required:
            raise UsageError(f"{option.flag} is required (or set {option.env})")
        else:
            setattr(args, option.dest, option.default)
    groups: dict[str, list[_EnvOption]] = {}
    for option in options:
        if option.group:
            groups.setdefault(option.group, []).append(option)
    for members in groups.values():
        chosen = [o for o in members if getattr(args, o.dest) is not None]
        flags = " or ".join(o.flag for o in members)
        if not chosen:
            raise UsageError(f"give {flags} (or set {' or '.join(o.env for o in members)})")
        if len(chosen) > 1:
            raise UsageError(f"give only one of {flags}; the environment sets "
                             f"{' and '.join(o.env for o in chosen)}")


# --------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _count(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return convert


def _id_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected upload ids separated by commas, e.g. 11,12,13, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one upload id, e.g. 11,12,13")
    return ids


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _out(line: str = "") -> None:
    print(line, file=sys.stdout)


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str), file=sys.stdout)


def _summary_lines(summary: Summary) -> list[str]:
    width = max(len(name) for name in Summary.columns())
    return [f"{name:<{width}}  {getattr(summary, name)}" for name in Summary.columns()]


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def _db_upgrade(args: argparse.Namespace) -> int:
    before, after = dbadmin.upgrade(args.dsn, args.revision)
    _err(f"flakectl: upgraded from {before or 'nothing'} to {after}" if before != after
         else f"flakectl: already at {after}")
    return 0


def _db_downgrade(args: argparse.Namespace) -> int:
    before, after = dbadmin.downgrade(args.dsn, args.revision)
    _err(f"flakectl: downgraded from {before or 'nothing'} to {after or 'nothing (flakectl removed)'}"
         if before != after else f"flakectl: already at {after or 'base'}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    revision = dbadmin.current(args.dsn)
    head = migrate.head()
    if args.json:
        _json({"revision": revision, "head": head, "up_to_date": revision == head})
    elif revision is None:
        _out(f"none (not installed; head is {head})")
    else:
        _out(f"{revision} (head)" if revision == head else f"{revision} (head is {head})")
    return 0


def _db_sql(args: argparse.Namespace) -> int:
    sys.stdout.write(dbadmin.offline_sql(args.revision, args.start))
    return 0


def _process(args: argparse.Namespace) -> int:
    options = dict(lookback=args.lookback, expire_after=args.expire_after,
                   dry_run=args.dry_run, wait=not args.no_wait)
    with connect(args.dsn) as conn:
        if args.commit is not None:
            summary = api.process_commit(conn, args.repo, args.commit, **options)
            what = f"commit {args.commit} of repository {args.repo}"
        else:
            summary = api.process_uploads(conn, args.repo, args.uploads, **options)
            what = f"uploads {','.join(map(str, args.uploads))} of repository {args.repo}"
    if args.json:
        _json({**asdict(summary), "dry_run": args.dry_run})
    else:
        for line in _summary_lines(summary):
            _out(line)
    if summary.uploads_processed == 0 and summary.uploads_skipped == 0:
        _err(f"flakectl: nothing to process for {what}: no processed test_results upload"
             " (check --repo and --commit)")
    elif summary.uploads_processed == 0:
        _err(f"flakectl: nothing to process for {what}: its {summary.uploads_skipped} upload(s)"
             " were processed before")
    if args.dry_run:
        _err("flakectl: dry run: nothing was written")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from flakectl.dba.verify import verify_commit

    with connect(args.dsn) as conn:
        result = verify_commit(conn, args.repo, args.commit,
                               lookback=args.lookback, expire_after=args.expire_after)
    if args.json:
        _json(result.as_json())
    elif result.identical:
        s = result.got
        _out(f"identical: repository {args.repo}, commit {args.commit}: {s.uploads_processed} uploads,"
             f" {s.testruns_considered} runs considered, {s.testruns_marked} marked,"
             f" flakes {s.flakes_created} created / {s.flakes_updated} updated / {s.flakes_expired} expired")
    else:
        _out(f"different: {len(result.differences)} difference(s) between the function and the"
             f" reference, repository {args.repo}, commit {args.commit}")
        for difference in result.differences:
            _out(f"  {difference}")
    if result.uploads and not result.got.uploads_processed and not result.expected.uploads_processed:
        _err(f"flakectl: the commit's {result.uploads} upload(s) were processed before, so the"
             " comparison covered nothing; verify a commit before it is processed")
    _err("flakectl: rolled back: nothing was changed")
    return 0 if result.identical else 1


def _status(args: argparse.Namespace) -> int:
    from flakectl.dba.status import read_status

    with connect(args.dsn) as conn:
        status = read_status(conn, args.repo, args.limit)
    if args.json:
        _json(status.as_json())
    else:
        for line in status.lines():
            _out(line)
    return 0


def _prune(args: argparse.Namespace) -> int:
    with connect(args.dsn) as conn:
        try:
            deleted = ledger.prune(conn, args.older_than)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{_plain(exc)}; use --older-than 2d or longer") from exc
    if args.json:
        _json({"deleted": deleted, "older_than_seconds": int(args.older_than.total_seconds())})
    else:
        _out(f"pruned {deleted} ledger row(s) older than {format_duration(args.older_than)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from flakectl.lab.demo import DemoSize, run_demo

    size = DemoSize(commits=args.commits, uploads=args.uploads, tests=args.tests,
                    flaky_share=args.flaky_share, seed=args.seed)
    return run_demo(size, json_output=args.json, out=sys.stdout, err=sys.stderr)


def _bench(args: argparse.Namespace) -> int:
    from flakectl.lab import bench

    with wrap_exceptions():  # a refused connection: one line, not a traceback
        return bench.run(args, out=sys.stdout, err=sys.stderr)


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------

_DSN_HELP = ("PostgreSQL URL or key=value DSN; else libpq's PGHOST, PGPORT, PGDATABASE, PGUSER,"
             " PGPASSWORD")


def _dsn(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--dsn", help=_DSN_HELP, env=ENV_URL, metavar="DSN")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--json", switch=True, help="print JSON instead of text")


def _call_options(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--repo", type=_whole, required=True, metavar="ID", help="repository id (commits.repoid)")
    _option(parser, "--lookback", type=_duration, default=reference.DEFAULT_LOOKBACK, metavar="DURATION",
            help=f"ignore runs older than this, e.g. {EXAMPLES}")
    _option(parser, "--expire-after", type=_positive_int, default=reference.DEFAULT_EXPIRE_AFTER,
            metavar="N", help="passes in a row that end a flake")


_DEFAULT_NOTE = re.compile(r" \(default [^()]*\)$")


def _env_options_from(parser: argparse.ArgumentParser, add_arguments: Callable,
                      overrides: dict[str, dict]) -> None:
    """Add the options that `add_arguments` declares (a module's plain argparse
    options) through _option, so they follow this command's conventions: each
    reads $FLAKECTL_<NAME>, its --help names the variable and the default, and
    a bad value is a usage error. Whole numbers must be 0 or more; `overrides`
    maps an option's dest to _option arguments of its own (type, env, help)."""
    plain = argparse.ArgumentParser(add_help=False)
    add_arguments(plain)
    for action in plain._actions:  # noqa: SLF001 - argparse lists them nowhere else
        switch = action.nargs == 0
        options = dict(
            help=action.help or action.dest.replace("_", " "), switch=switch, dest=action.dest,
            default=None if switch else action.default,
            type=_one_of(list(action.choices)) if action.choices
            else _count if action.type is int else action.type or str,
            metavar=None if switch or action.choices else "N" if action.type is int else action.dest.upper(),
        )
        if action.choices:
            options["choices"] = action.choices
        if options["default"] is not None:  # _option shows it
            options["help"] = _DEFAULT_NOTE.sub("", options["help"])
        options.update(overrides.get(action.dest, {}))
        _option(parser, max(action.option_strings, key=len), **options)


def _sub(subparsers, name: str, help: str, example: str, func) -> argparse.ArgumentParser:  # noqa: ANN001, A002
    parser = subparsers.add_parser(name, help=help, description=help.rstrip(".") + ".",
                                   epilog=f"example:\n{example}")
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="In-database flaky-test detection for Codecov test analytics.",
        epilog="examples:\n"
               "  flakectl demo                                  # try it on a throwaway server\n"
               "  flakectl --help; flakectl process --help       # every command has an example\n"
               f"\nThe database: --dsn, else ${ENV_URL}, else libpq's PG* variables.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)

    db = _sub(commands, "db", "install, upgrade and inspect flakectl's schema (Alembic)",
              "  flakectl db upgrade --dsn postgresql://postgres@localhost/codecov", None)
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True,
                                    parser_class=_Parser)
    p = _sub(db_commands, "upgrade", "upgrade the database to REV (default: head)",
             "  flakectl db upgrade                 # to the newest revision\n"
             "  flakectl db upgrade 0002", _db_upgrade)
    p.add_argument("revision", nargs="?", default="head", metavar="REV")
    _dsn(p)
    p = _sub(db_commands, "downgrade", "downgrade the database to REV (base: remove flakectl)",
             "  flakectl db downgrade 0002", _db_downgrade)
    p.add_argument("revision", metavar="REV")
    _dsn(p)
    p = _sub(db_commands, "current", "print the installed revision",
             "  FLAKECTL_DATABASE_URL=postgresql://postgres@localhost/codecov flakectl db current",
             _db_current)
    _dsn(p)
    _json_flag(p)
    p = _sub(db_commands, "sql", "print the SQL an upgrade to REV (default: head) runs, to apply by hand",
             "  flakectl db sql > flakectl.sql && psql -v ON_ERROR_STOP=1 -f flakectl.sql codecov\n"
             "  flakectl db sql head --from 0002   # only what comes after 0002", _db_sql)
    p.add_argument("revision", nargs="?", default="head", metavar="REV")
    _option(p, "--from", type=str, metavar="REV", dest="start",
            help="the revision the database is at (default: nothing installed)")

    p = _sub(commands, "process", "process a commit's uploads (or given uploads) and print the summary row",
             "  flakectl process --repo 1234 --commit 3f2a9c1 --dry-run\n"
             "  flakectl process --repo 1234 --uploads 11,12,13 --json", _process)
    _dsn(p)
    _call_options(p)
    which = p.add_mutually_exclusive_group()
    _option(p, "--commit", metavar="SHA", group="which", target=which,
            help="process the commit's processed test_results uploads")
    _option(p, "--uploads", type=_id_list, metavar="ID,ID,...", group="which", target=which,
            help="process these upload ids as they are (flakectl.process_uploads)")
    _option(p, "--dry-run", switch=True, help="compute and print the row, write nothing")
    _option(p, "--no-wait", switch=True,
            help="fail at once if another call holds the repository's lock, instead of waiting")
    _json_flag(p)

    p = _sub(commands, "verify",
             "run the function and the reference on a commit in a rolled-back transaction and compare",
             "  flakectl verify --repo 1234 --commit 3f2a9c1\n\n"
             "Prints `identical` (exit 0) or each difference: row, field, expected, got (exit 1).\n"
             "Verify a commit before it is processed: afterwards its uploads are in the ledger\n"
             "and there is nothing left to compare. An unknown commit is an error (exit 1).",
             _verify)
    _dsn(p)
    _call_options(p)
    _option(p, "--commit", required=True, metavar="SHA", help="the commit to verify")
    _json_flag(p)

    p = _sub(commands, "status", "show the installed version, the ledger and the flakes per repository",
             "  flakectl status\n"
             "  flakectl status --repo 1234 --limit 10   # and its open flakes, most failing first",
             _status)
    _dsn(p)
    _option(p, "--repo", type=_whole, metavar="ID", help="also list this repository's open flakes")
    _option(p, "--limit", type=_positive_int, default=50, metavar="N", help="list at most N open flakes")
    _json_flag(p)

    p = _sub(commands, "prune", "delete ledger rows older than an age (flakectl.prune_ledger)",
             "  flakectl prune --older-than 30d\n\n"
             "Ages under 2d (twice the default lookback) are refused: such an upload could be\n"
             "processed, and counted, again.", _prune)
    _dsn(p)
    _option(p, "--older-than", type=_duration, required=True, metavar="DURATION",
            help=f"the age, e.g. {EXAMPLES}")
    _json_flag(p)

    p = _sub(commands, "demo",
             "generate a repository history on a throwaway PostgreSQL, process it, compare with the truth",
             "  flakectl demo\n"
             "  flakectl demo --commits 4 --uploads 3 --tests 200   # a small one\n\n"
             "Needs the PostgreSQL server binaries (initdb, postgres; FLAKECTL_PG_BIN); leaves\n"
             "no server or files behind, also on Ctrl-C.", _demo)
    _option(p, "--commits", type=_positive_int, default=30, metavar="N", help="merged commits")
    _option(p, "--uploads", type=_positive_int, default=8, metavar="N", help="uploads (CI jobs) per commit")
    _option(p, "--tests", type=_positive_int, default=3000, metavar="N", help="tests per upload")
    _option(p, "--flaky-share", type=_share, default=0.01, metavar="X",
            help="share of tests that are genuinely flaky")
    _option(p, "--seed", type=_whole, default=1, metavar="N", help="random seed (same seed, same data)")
    _json_flag(p)

    from flakectl.lab import bench

    p = _sub(commands, "bench",
             "time the function (A) against the worker's Python path (B) and the read floor (C) on a"
             " generated commit",
             "  flakectl bench --uploads 5 --tests 2000 --other-rows 0   # a small one\n"
             "  flakectl bench --shape storm --json\n"
             "  flakectl bench --dsn postgresql://postgres@localhost/scratch --keep\n\n"
             "Without --dsn on a throwaway PostgreSQL (server binaries needed, as for demo). The\n"
             "default size is 1M runs in the commit plus 1M other rows: slow to generate, and on\n"
             "2 CPUs each call of B alone takes about 6 s. With --dsn, in a scratch schema\n"
             "flakectl_bench of that database, which must have flakectl installed;\n"
             "$FLAKECTL_DATABASE_URL is not read, so the bench never writes to a database nobody\n"
             "named for it. Every call is rolled back. Exit 1 when A and B leave different\n"
             "states, or when it refuses the database (one line `flakectl: error: ...`).",
             _bench)
    _env_options_from(p, bench.add_arguments, {
        "dsn": {"env": "FLAKECTL_BENCH_DSN", "metavar": "DSN"},
        "uploads": {"type": _positive_int}, "tests": {"type": _positive_int},
        "repeat": {"type": _positive_int},
        "seed": {"type": _whole, "help": "random seed (same seed, same data)"},
    })
    return parser


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def _plain(exc: BaseException) -> str:
    """An error's message on one line, without the server's `flakectl: ` prefix."""
    text = " ".join(str(exc).split())
    while text.startswith(f"{PROG}: "):
        text = text[len(PROG) + 2:]
    return text


def _describe(exc: FlakectlError) -> str:
    if isinstance(exc, LockNotAvailable):
        return f"{_plain(exc)}; retry later, or leave out --no-wait to wait for it"
    if isinstance(exc, WrongIsolationLevel):
        return f"{_plain(exc)}; set default_transaction_isolation = 'read committed' for this role"
    if isinstance(exc, NotInstalled):
        return _plain(exc)
    if exc.sqlstate and type(exc) is FlakectlError:
        return f"the database refused (SQLSTATE {exc.sqlstate}): {_plain(exc)}"
    return _plain(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit code (0 ok, 1 error or difference, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _apply_env(args)
    except UsageError as exc:
        _err(f"{PROG}: error: {exc}")
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except FlakectlError as exc:
        _err(f"{PROG}: error: {_describe(exc)}")
        return 1
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:
        # the reader left (`flakectl db sql | head`); keep Python's exit flush quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
