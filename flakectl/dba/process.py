"""`flakectl process`: run flakectl.process_commit or process_uploads and
print the summary row.

`--uploads` is where a person types ids, and process_uploads trusts its list
(SPEC): an id that has no run yet is recorded in the ledger all the same, and
the upload is skipped when it arrives. So the command refuses ids without a
run of the repository, naming them, unless --force."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from flakectl.dba import options as o
from flakectl.errors import FlakectlError


class UnknownUploads(FlakectlError):
    """Upload ids without a run of the repository (a typo would be recorded as processed)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o.example(parser, "  flakectl process --repo 1234 --commit 3f2a9c1 --dry-run\n"
                      "  flakectl process --repo 1234 --uploads 11,12,13 --json")
    o.dsn(parser)
    o.call_options(parser)
    which = parser.add_mutually_exclusive_group()
    o.option(parser, "--commit", metavar="SHA", group="which", target=which,
             help="process the commit's processed test_results uploads")
    o.option(parser, "--uploads", type=o.id_list, metavar="ID,ID,...", group="which", target=which,
             help="process these upload ids as they are (flakectl.process_uploads)")
    o.option(parser, "--force", switch=True, env="FLAKECTL_PROCESS_FORCE",
             help="with --uploads: process (and record) ids that have no run of the repository")
    o.option(parser, "--dry-run", switch=True, help="compute and print the row, write nothing")
    o.option(parser, "--no-wait", switch=True,
             help="fail at once if another call holds the repository's lock, instead of waiting")
    o.json_flag(parser)


def summary_lines(summary) -> list[str]:  # noqa: ANN001 - flakectl.model.Summary
    width = max(len(name) for name in summary.columns())
    return [f"{name:<{width}}  {getattr(summary, name)}" for name in summary.columns()]


def _refuse_uploads_without_runs(conn, repo: int, uploads: list[int]) -> None:  # noqa: ANN001
    import psycopg
    from psycopg import sql

    from flakectl.errors import wrap_exceptions

    ids = ",".join(map(str, sorted(set(uploads))))
    try:
        with wrap_exceptions(), conn.transaction():
            # the Codecov schema the install recorded (as flakectl.dba.migrate.codecov_schema,
            # which imports Alembic), `public` before revision 0005 (or unreadable to this role)
            (readable,) = conn.execute(
                "select case when not exists (select from pg_namespace where nspname = 'flakectl')"
                "            then false"
                "            when not has_schema_privilege('flakectl', 'usage') then false"
                "            when to_regclass('flakectl.codecov_schema') is null then false"
                "            else has_table_privilege('flakectl.codecov_schema', 'select') end").fetchone()
            row = conn.execute("select name from flakectl.codecov_schema").fetchone() if readable else None
            schema = row[0] if row else None
            missing = [row[0] for row in conn.execute(sql.SQL(
                "select u from unnest(%s::bigint[]) as u"
                " where not exists (select from {}.ta_timeseries_testrun r"
                "                    where r.upload_id = u and r.repo_id = %s)"
                " group by u order by u").format(sql.Identifier(schema or "public")), (uploads, repo))]
    except FlakectlError as exc:
        if not isinstance(exc.__cause__, psycopg.errors.InsufficientPrivilege):
            raise
        raise UnknownUploads(
            f"cannot check that upload(s) {ids} have runs of repository {repo}: {exc}; run as a role"
            " that can read the runs table, or give --force to process them unchecked") from exc
    if missing:
        raise UnknownUploads(
            f"no test run of repository {repo} in upload(s) {','.join(map(str, missing))}: check"
            " --repo and --uploads; processing them would record them in the ledger, and skip them"
            " if they arrive later (--force to do it anyway)")


def run(args: argparse.Namespace) -> int:
    from flakectl import api
    from flakectl.dba.connection import connect

    options = dict(lookback=args.lookback, expire_after=args.expire_after,
                   dry_run=args.dry_run, wait=not args.no_wait)
    with connect(args.dsn) as conn:
        if args.commit is not None:
            summary = api.process_commit(conn, args.repo, args.commit, **options)
            what = f"commit {args.commit} of repository {args.repo}"
        else:
            if not args.force:
                _refuse_uploads_without_runs(conn, args.repo, args.uploads)
            summary = api.process_uploads(conn, args.repo, args.uploads, **options)
            what = f"uploads {','.join(map(str, args.uploads))} of repository {args.repo}"
    if args.json:
        o.print_json({**asdict(summary), "dry_run": args.dry_run})
    else:
        for line in summary_lines(summary):
            o.out(line)
    if summary.uploads_processed == 0 and summary.uploads_skipped == 0:
        o.err(f"flakectl: nothing to process for {what}: no processed test_results upload"
              " (check --repo and --commit)")
    elif summary.uploads_processed == 0:
        o.err(f"flakectl: nothing to process for {what}: its {summary.uploads_skipped} upload(s)"
              " were processed before")
    if args.dry_run:
        o.err("flakectl: dry run: nothing was written")
    return 0
