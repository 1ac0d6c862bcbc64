"""The flakectl command's shared option machinery, light to import.

Every command module declares its options with `option()`: each flag also
reads an environment variable (named in --help; the flag wins), and a bad
value is a usage error (exit 2). `apply_env()` fills what the command line
left out. Argument types and the output helpers (data on stdout,
diagnostics on stderr) live here too.

This module and every command module's `add_arguments` import nothing heavy
(no psycopg, SQLAlchemy or Alembic): `flakectl --help` and
`flakectl process --help` must start fast. Import those inside `run()`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from flakectl.dba.durations import EXAMPLES, format_duration, parse_duration

PROG = "flakectl"
ENV_PREFIX = "FLAKECTL_"
ENV_URL = "FLAKECTL_DATABASE_URL"  # = flakectl.dba.connection.ENV_URL (that module imports psycopg)


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


# --------------------------------------------------------------------------
# Options that also read an environment variable
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvOption:
    dest: str
    env: str
    flag: str
    convert: Callable[[str], object]
    default: object
    required: bool
    group: str | None  # options of one group exclude each other


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(_env_options=[])

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def env_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def env_options(parser: argparse.ArgumentParser) -> list[EnvOption]:
    """The options `option()` declared on `parser`."""
    return parser.get_default("_env_options")


def option(parser: argparse.ArgumentParser, flag: str, *, help: str, type: Callable = str,  # noqa: A002
           default: object = None, required: bool = False, switch: bool = False,
           env: str | None = None, group: str | None = None, target=None,  # noqa: ANN001
           dest: str | None = None, **kwargs) -> None:
    """Add `flag`, reading $FLAKECTL_<NAME> (or `env`) when the flag is not given.

    An environment variable has one meaning across all commands
    (tests/test_cli.py checks it): a flag whose value means something else
    in another command gets its own `env`, e.g. FLAKECTL_DEMO_UPLOADS.
    """
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
    env_options(parser).append(
        EnvOption(dest, env, flag, env_bool if switch else type,
                  False if switch and default is None else default, required, group))


def apply_env(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from the environment, then defaults."""
    options: list[EnvOption] = getattr(args, "_env_options", [])
    given_groups = {o.group for o in options if o.group and getattr(args, o.dest) is not None}
    for opt in options:
        if getattr(args, opt.dest) is not None:
            continue
        text = os.environ.get(opt.env)
        if text is not None and text != "" and opt.group not in given_groups:
            try:
                value = opt.convert(text)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"{opt.env}={text!r} (for {opt.flag}): {exc}") from None
            setattr(args, opt.dest, value)
        elif opt.required:
            raise UsageError(f"{opt.flag} is required (or set {opt.env})")
        else:
            setattr(args, opt.dest, opt.default)
    groups: dict[str, list[EnvOption]] = {}
    for opt in options:
        if opt.group:
            groups.setdefault(opt.group, []).append(opt)
    for members in groups.values():
        chosen = [o for o in members if getattr(args, o.dest) is not None]
        flags = " or ".join(o.flag for o in members)
        if not chosen:
            raise UsageError(f"give {flags} (or set {' or '.join(o.env for o in members)})")
        if len(chosen) > 1:
            raise UsageError(f"give only one of {flags}; the environment sets "
                             f"{' and '.join(o.env for o in chosen)}")


def example(parser: argparse.ArgumentParser, text: str) -> None:
    """The `example:` section of a command's --help (every command has one)."""
    parser.epilog = f"example:\n{text}"


# --------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------


def duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


BIGINT_MAX = 2**63 - 1


def bigint(text: str) -> int:
    """A whole number PostgreSQL's bigint holds (a repository id: the tables'
    columns are bigint or integer; the function refuses ids outside integer)."""
    value = whole(text)
    if not -BIGINT_MAX - 1 <= value <= BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"must fit a bigint ({-BIGINT_MAX - 1} to {BIGINT_MAX}), got {value}")
    return value


def positive_bigint(text: str) -> int:
    """1 or more, at most bigint's maximum (a LIMIT)."""
    value = positive_int(text)
    if value > BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {BIGINT_MAX}, got {value}")
    return value


def count(text: str) -> int:
    value = whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return convert


def id_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected upload ids separated by commas, e.g. 11,12,13, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one upload id, e.g. 11,12,13")
    return ids


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


# --------------------------------------------------------------------------
# Options several commands share
# --------------------------------------------------------------------------

DSN_HELP = ("PostgreSQL URL or key=value DSN; else libpq's PGHOST, PGPORT, PGDATABASE, PGUSER,"
            " PGPASSWORD")

def dsn(parser: argparse.ArgumentParser) -> None:
    option(parser, "--dsn", help=DSN_HELP, env=ENV_URL, metavar="DSN")


def json_flag(parser: argparse.ArgumentParser) -> None:
    option(parser, "--json", switch=True, help="print JSON instead of text")


def call_options(parser: argparse.ArgumentParser) -> None:
    from flakectl.reference import DEFAULT_EXPIRE_AFTER, DEFAULT_LOOKBACK

    option(parser, "--repo", type=bigint, required=True, metavar="ID", help="repository id (commits.repoid)")
    option(parser, "--lookback", type=duration, default=DEFAULT_LOOKBACK, metavar="DURATION",
           help=f"ignore runs older than this, e.g. {EXAMPLES}")
    option(parser, "--expire-after", type=positive_int, default=DEFAULT_EXPIRE_AFTER,
           metavar="N", help="passes in a row that end a flake")


_DEFAULT_NOTE = re.compile(r" \(default [^()]*\)$")


def env_options_from(parser: argparse.ArgumentParser, add_arguments: Callable,
                     overrides: dict[str, dict]) -> None:
    """Add the options that `add_arguments` declares (a module's plain argparse
    options) through option(), so they follow this command's conventions: each
    reads $FLAKECTL_<NAME>, its --help names the variable and the default, and
    a bad value is a usage error. Whole numbers must be 0 or more; `overrides`
    maps an option's dest to option() arguments of its own (type, env, help)."""
    plain = argparse.ArgumentParser(add_help=False)
    add_arguments(plain)
    for action in plain._actions:  # noqa: SLF001 - argparse lists them nowhere else
        switch = action.nargs == 0
        options = dict(
            help=action.help or action.dest.replace("_", " "), switch=switch, dest=action.dest,
            default=None if switch else action.default,
            type=one_of(list(action.choices)) if action.choices
            else count if action.type is int else action.type or str,
            metavar=None if switch or action.choices else "N" if action.type is int else action.dest.upper(),
        )
        if action.choices:
            options["choices"] = action.choices
        if options["default"] is not None:  # option() shows it
            options["help"] = _DEFAULT_NOTE.sub("", options["help"])
        options.update(overrides.get(action.dest, {}))
        option(parser, max(action.option_strings, key=len), **options)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def out(line: str = "") -> None:
    print(line, file=sys.stdout)


def err(line: str) -> None:
    print(line, file=sys.stderr)


def printable(text: str) -> str:
    r"""Text from the database (test names, shas from CI data) made safe for a
    terminal: a backslash, and every character that is not printable (newline,
    ESC of an ANSI sequence, other controls), shown as a Python escape
    (`\\`, `\n`, `\x1b`), so a row is one line and nothing reaches the
    terminal as a command."""
    return "".join(c if c.isprintable() and c != "\\" else
                   "\\\\" if c == "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str), file=sys.stdout)


def plain(exc: BaseException) -> str:
    """An error's message on one line, without the server's `flakectl: ` prefix."""
    text = " ".join(str(exc).split())
    while text.startswith(f"{PROG}: "):
        text = text[len(PROG) + 2:]
    return text
