"""The same task on SQLAlchemy sessions (1.4 or 2.x), the worker's other stack:
one session on the main database for the upload ids, one on the runs
database for the call. Plain SQL instead of models: the worker's SQLAlchemy
models are its own."""

from __future__ import annotations

from sqlalchemy import text

import flakectl

UPLOAD_IDS = text(
    "select u.id from reports_upload u"
    "  join reports_commitreport r on r.id = u.report_id"
    "  join commits c on c.id = r.commit_id"
    " where c.repoid = :repo_id and c.commitid = :commit_sha"
    "   and r.report_type = 'test_results' and u.state = 'processed'"
    " order by u.id"
)


def process_flakes_for_commit(main_session, runs_session, repo_id: int, commit_sha: str,  # noqa: ANN001
                              *, wait: bool = False) -> flakectl.Summary:
    ids = [row[0] for row in main_session.execute(UPLOAD_IDS, {"repo_id": repo_id, "commit_sha": commit_sha})]
    return flakectl.process_uploads(runs_session, repo_id, ids, wait=wait)
