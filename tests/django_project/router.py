"""Routing as Codecov's `shared.django_apps.db_routers.MultiDatabaseRouter`
routes test analytics: the `ta_timeseries` app to its own database, every
other app to `default`, no relations across the two."""

from __future__ import annotations

RUNS_APP = "ta_timeseries"


def _database(model) -> str:  # noqa: ANN001 - a Django model class
    return RUNS_APP if model._meta.app_label == RUNS_APP else "default"  # noqa: SLF001


class MultiDatabaseRouter:
    def db_for_read(self, model, **hints) -> str:  # noqa: ANN001, ANN003
        return _database(model)

    def db_for_write(self, model, **hints) -> str:  # noqa: ANN001, ANN003
        return _database(model)

    def allow_migrate(self, db: str, app_label: str, model_name=None, **hints) -> bool:  # noqa: ANN001, ANN003
        return (app_label == RUNS_APP) == (db == RUNS_APP)

    def allow_relation(self, obj1, obj2, **hints) -> bool:  # noqa: ANN001, ANN003
        apps = {obj1._meta.app_label, obj2._meta.app_label}  # noqa: SLF001
        return RUNS_APP not in apps or apps == {RUNS_APP}
