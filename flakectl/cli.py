"""The `flakectl` command: DBA maintenance, verification against the
reference, and a demo on a throwaway server.

    flakectl db upgrade|downgrade|current|sql     install and inspect the schema
    flakectl process --repo ID --commit SHA       run the function, print its row
    flakectl verify --repo ID --commit SHA        function vs. reference, rolled back
    flakectl status [--repo ID]                   what is installed, what the tables hold
    flakectl prune --older-than 30d               forget old ledger rows
    flakectl split --main-dsn M --runs-dsn R      move to the split layout (--undo: back)
    flakectl demo                                 the whole thing on a throwaway server
    flakectl bench                                the function vs the worker's path, timed

Every option also reads an environment variable, named in --help (flags
given on the command line win). Data goes to stdout, diagnostics to stderr. A
user mistake prints one line `flakectl: error: ...` and exits 1 (2 for a
wrong command line); `verify` exits 1 when the function and the reference
differ, `bench` when the function and the worker's path leave different states.

This module is only the dispatcher: the parser skeleton, the error-to-exit-code
mapping and main(). Each command lives in a module of its own, imported only
when that command runs (so `flakectl --help` starts fast).

Adding a command (e.g. `split`, `replay`, `db grant`):

1. Write a module, e.g. flakectl/dba/split.py, with
       def add_arguments(parser: argparse.ArgumentParser) -> None
       def run(args: argparse.Namespace) -> int       # the exit code
   add_arguments declares the options with flakectl.dba.options
   (`o.option(parser, "--main-dsn", help=..., metavar="DSN")`: each flag reads
   an environment variable, FLAKECTL_<FLAG> unless `env=` names another; one
   variable, one meaning across all commands, tests/test_cli.py checks it) and
   the --help example (`o.example(parser, "  flakectl split --main-dsn ...")`,
   every command has one). Keep the module's top-level imports light (no
   psycopg, SQLAlchemy or Alembic at import time if you can: import them in
   run()). run() prints data with o.out / o.print_json, diagnostics with
   o.err; it raises flakectl.errors.FlakectlError (or a subclass) for a user
   mistake or a server error: main() prints it as one `flakectl: error: ...`
   line and exits 1.
2. Register it below in COMMANDS, one line:
       Command("split", "flakectl.dba.split", "move a deployment to the split layout"),
   A `db` action is Command("db grant", "flakectl.dba.grant", "..."). Several
   commands in one module: "module:NAME" means add_NAME_arguments() and
   run_NAME() (as flakectl.dba.dbadmin does for the db actions).
3. Add its words to SUBCOMMANDS in tests/test_cli.py (its --help is then
   checked for the example and the variables) and test its exact lines
   through main([...]).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from flakectl.dba import options
from flakectl.dba.options import ENV_URL, PROG, UsageError


@dataclass(frozen=True)
class Command:
    words: str   # "process", or "db upgrade" for an action of the `db` group
    target: str  # "package.module" (add_arguments, run) or "package.module:NAME" (add_NAME_arguments, run_NAME)
    help: str    # one line, shown in the parent's --help and as the description


GROUPS = {
    "db": ("install, upgrade and inspect flakectl's schema (Alembic)",
           "  flakectl db upgrade --dsn postgresql://postgres@localhost/codecov"),
}

COMMANDS = [
    Command("db upgrade", "flakectl.dba.dbadmin:upgrade", "upgrade the database to REV (default: head)"),
    Command("db downgrade", "flakectl.dba.dbadmin:downgrade",
            "downgrade the database to REV (base: remove flakectl)"),
    Command("db current", "flakectl.dba.dbadmin:current", "print the installed revision"),
    Command("db sql", "flakectl.dba.dbadmin:sql",
            "print the SQL an upgrade to REV (default: head) runs, to apply by hand"),
    Command("db grant", "flakectl.dba.grant",
            "let ROLE call process_commit and process_uploads, and nothing else (--revoke: take it back)"),
    Command("process", "flakectl.dba.process",
            "process a commit's uploads (or given uploads) and print the summary row"),
    Command("verify", "flakectl.dba.verify",
            "run the function and the reference on a commit in a rolled-back transaction and compare"),
    Command("status", "flakectl.dba.status",
            "show the installed version, the ledger and the flakes per repository"),
    Command("replay", "flakectl.dba.replay",
            "recompute a repository's flakes from its history, show the rows that differ, repair them"),
    Command("prune", "flakectl.dba.ledger", "delete ledger rows older than an age (flakectl.prune_ledger)"),
    Command("split", "flakectl.dba.split", "move a deployment to Codecov's split layout (runs and main"
            " databases), or back with --undo"),
    Command("demo", "flakectl.lab.demo",
            "generate a repository history on a throwaway PostgreSQL, process it, compare with the truth"),
    Command("bench", "flakectl.lab.bench:cli",
            "time the function (A) against the worker's Python path (B), the read floor (C) and the"
            " write floor (W) on a generated commit, or a fleet of workers (--fleet)"),
]


def _load(command: Command, parser: argparse.ArgumentParser) -> None:
    """Import the command's module and declare its arguments on `parser`."""
    module_name, _, name = command.target.partition(":")
    module = importlib.import_module(module_name)
    add = getattr(module, f"add_{name}_arguments" if name else "add_arguments")
    add(parser)
    parser.set_defaults(func=getattr(module, f"run_{name}" if name else "run"))


def _chosen(argv: Sequence[str]) -> str:
    """The command's words in `argv` ("db upgrade"), as far as they go."""
    words = [w for w in argv if not w.startswith("-")][:2]  # the top level has no option with a value
    if words and words[0] in GROUPS:
        return " ".join(words)
    return words[0] if words else ""


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):  # noqa: ANN001
        super().__init__(option_strings, dest, nargs=0, help="print flakectl's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("flakectl")
        except PackageNotFoundError:
            text = "(not installed as a package)"
        print(f"{PROG} {text}")
        parser.exit()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command it names is imported and declared
    (the others are listed by name), without it every command is."""
    chosen = None if argv is None else _chosen(argv)
    parser = options.Parser(
        prog=PROG,
        description="In-database flaky-test detection for Codecov test analytics.",
        epilog="examples:\n"
               "  flakectl demo                                  # try it on a throwaway server\n"
               "  flakectl --help; flakectl process --help       # every command has an example\n"
               f"\nThe database: --dsn, else ${ENV_URL}, else libpq's PG* variables.",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = {"": parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                            parser_class=options.Parser)}
    for group, (help, example) in GROUPS.items():  # noqa: A001
        p = subparsers[""].add_parser(group, help=help, description=help.rstrip(".") + ".",
                                      epilog=f"example:\n{example}")
        subparsers[group] = p.add_subparsers(dest=f"{group}_command", metavar="ACTION", required=True,
                                             parser_class=options.Parser)
    for command in COMMANDS:
        *parent, name = command.words.split()
        p = subparsers[" ".join(parent)].add_parser(name, help=command.help,
                                                    description=command.help.rstrip(".") + ".")
        if chosen is None or chosen == command.words:
            _load(command, p)
    return parser


def _join_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--lookback -1d` as `--lookback=-1d`: argparse takes a value starting with `-`
    for an option (`expected one argument`); joined, the option's own check speaks."""
    takes_value = set()
    known = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:  # noqa: SLF001
            known.update(action.option_strings)
            if action.option_strings and action.nargs is None:
                takes_value.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                stack.extend(action.choices.values())
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out.extend(argv[i:])
            break
        if (word in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and argv[i + 1] not in known and argv[i + 1] != "--"):
            out.append(f"{word}={argv[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def _own_remedy() -> tuple[type, ...]:
    """Errors whose message ends with the command's own remedy, in place of the server's
    HINT (written for SQL callers: `call with wait => true`, `add explicit type casts`)."""
    from flakectl.errors import LockNotAvailable, NotInstalled, WrongIsolationLevel

    return (LockNotAvailable, NotInstalled, WrongIsolationLevel)


def _describe(exc: Exception) -> str:
    from flakectl.errors import FlakectlError, LockNotAvailable, NotInstalled, PermissionDenied, WrongIsolationLevel

    plain = options.plain
    if isinstance(exc, PermissionDenied):
        return f"{plain(exc)}; {exc.remedy}"
    if isinstance(exc, LockNotAvailable):
        return f"{plain(exc)}; retry later, or leave out --no-wait to wait for it"
    if isinstance(exc, WrongIsolationLevel):
        return f"{plain(exc)}; set default_transaction_isolation = 'read committed' for this role"
    if isinstance(exc, NotInstalled):
        return plain(exc)
    if getattr(exc, "sqlstate", None) and type(exc) is FlakectlError:
        return f"the database refused (SQLSTATE {exc.sqlstate}): {plain(exc)}"
    return plain(exc)


def _server_diagnostics(exc: BaseException) -> list[str]:
    """The server's DETAIL and HINT for an error raised from a server error (found
    along the chain of causes: a psycopg error, or SQLAlchemy's wrapping of one)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        diag = getattr(cause, "diag", None) or getattr(getattr(cause, "orig", None), "diag", None)
        if diag is not None and diag.message_primary:
            return [f"{PROG}: {label}: {' '.join(text.split())}"
                    for label, text in (("detail", diag.message_detail), ("hint", diag.message_hint))
                    if text]
        cause = cause.__cause__ or cause.__context__
    return []


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, systemd, kill): handled as Ctrl-C is, so psycopg
    cancels the statement running on the server (a call parked on the
    repository's lock, say) before the command exits, and its transaction
    rolls back instead of running on, holding the lock."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _on_sigterm(handler):  # noqa: ANN001, ANN202 - a signal handler, and the one it replaces
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # main() called in a thread other than the main one: leave signals alone
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit code (0 ok, 1 error or difference, 2 usage, 130 interrupted,
    143 terminated)."""
    from flakectl.errors import FlakectlError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(_join_dash_values(parser, argv))
        options.apply_env(args)
    except UsageError as exc:
        options.err(f"{PROG}: error: {exc}")
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    previous = _on_sigterm(_terminated)
    try:
        return args.func(args)
    except FlakectlError as exc:
        options.err(f"{PROG}: error: {_describe(exc)}")
        for line in _server_diagnostics(exc):
            if not (line.startswith(f"{PROG}: hint: ") and isinstance(exc, _own_remedy())):
                options.err(line)
        return 1
    except Terminated:
        options.err(f"{PROG}: terminated")
        return 143
    except ModuleNotFoundError as exc:
        if exc.name != "psycopg":
            raise
        # psycopg 3 is an extra: a worker's environment has psycopg2 only (flakectl db works there)
        options.err(f"{PROG}: error: this command needs psycopg 3, the flakectl command's driver:"
                    " pip install 'flakectl[cli]'")
        return 1
    except KeyboardInterrupt:
        options.err(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:
        # the reader left (`flakectl db sql | head`); keep Python's exit flush quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if previous is not None:
            _on_sigterm(previous)
