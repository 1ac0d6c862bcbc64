"""A Django project shaped like Codecov's worker, for the integration tests.

Two databases as Codecov has them: `default` (commits and reports, the main
database) and `ta_timeseries` (test runs, flakes and flakectl: the split
layout's runs database), routed as Codecov's router routes them (`router`).
`tasks` is the flake-processing task written as the worker would write it;
`sqla` is the same task on SQLAlchemy sessions (the worker's other stack).
"""
