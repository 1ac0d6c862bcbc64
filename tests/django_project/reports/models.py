"""Codecov's main-database tables flakectl reads (core.Commit, reports.*), unmanaged."""

from django.db import models


class Commit(models.Model):
    id = models.BigAutoField(primary_key=True)
    commitid = models.TextField()
    repoid = models.IntegerField()
    branch = models.TextField(null=True)
    merged = models.BooleanField(null=True)
    timestamp = models.DateTimeField(null=True)

    class Meta:
        db_table = "commits"
        managed = False


class CommitReport(models.Model):
    class ReportType(models.TextChoices):
        COVERAGE = "coverage"
        TEST_RESULTS = "test_results"

    id = models.BigAutoField(primary_key=True)
    commit = models.ForeignKey(Commit, on_delete=models.CASCADE, related_name="reports")
    code = models.TextField(null=True)
    report_type = models.TextField(null=True, choices=ReportType.choices)

    class Meta:
        db_table = "reports_commitreport"
        managed = False


class ReportSession(models.Model):
    """One upload (Codecov's name for reports_upload rows)."""

    id = models.BigAutoField(primary_key=True)
    report = models.ForeignKey(CommitReport, on_delete=models.CASCADE, related_name="sessions")
    state = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        db_table = "reports_upload"
        managed = False
