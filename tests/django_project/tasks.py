"""The flake-processing task as the worker writes it with flakectl (docs/worker.md).

It replaces services/test_analytics/ta_process_flakes.py: the upload ids come
from the main database (the reports are not linked into the runs database),
and one call in the runs database does the rest, under the repository's
advisory lock (no Redis lock) and exactly once per upload (a retry is safe).
"""

from __future__ import annotations

from django.db import connections

import flakectl
from django_project.reports.models import CommitReport, ReportSession

#: Retry later: another call holds the repository (55P03, wait=False), or a
#: concurrent call of another repository recorded one of these uploads (40001).
RETRY_SQLSTATES = frozenset({"55P03", "40001"})


def upload_ids(repo_id: int, commit_sha: str) -> list[int]:
    """The commit's processed test-results uploads, from `default` (the router's choice)."""
    return list(
        ReportSession.objects.filter(
            report__report_type=CommitReport.ReportType.TEST_RESULTS,
            report__commit__repoid=repo_id,
            report__commit__commitid=commit_sha,
            state="processed",
        ).order_by("id").values_list("id", flat=True)
    )


def process_flakes_for_commit(repo_id: int, commit_sha: str, *, wait: bool = False) -> flakectl.Summary:
    return flakectl.process_uploads(
        connections["ta_timeseries"], repo_id, upload_ids(repo_id, commit_sha), wait=wait
    )


def should_retry(exc: flakectl.FlakectlError) -> bool:
    """Retry on 55P03 and 40001 (and a lost connection); never on bad input (22xxx);
    0A000 (isolation level) and 42501 (no grant) are configuration: retrying cannot help."""
    return exc.sqlstate in RETRY_SQLSTATES or isinstance(exc, flakectl.ConnectionFailed)
