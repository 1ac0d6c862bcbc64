"""The DBA tools behind `flakectl`: install and upgrade, status, verify, prune."""
