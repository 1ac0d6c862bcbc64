"""The runs database's test-run table, unmanaged (a TimescaleDB hypertable in Codecov)."""

from django.db import models


class Testrun(models.Model):
    # The table has no primary key; Django needs one to build queries.
    timestamp = models.DateTimeField(primary_key=True)
    test_id = models.BinaryField()
    outcome = models.TextField()
    repo_id = models.BigIntegerField()
    upload_id = models.BigIntegerField(null=True)

    class Meta:
        db_table = "ta_timeseries_testrun"
        managed = False
