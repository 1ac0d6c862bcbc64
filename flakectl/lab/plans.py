"""The plans of the statements a PL/pgSQL function runs, as they ran.

EXPLAIN of `select flakectl.process_commit(...)` shows one Function Scan: the
function's own statements run through SPI, out of EXPLAIN's sight.
auto_explain with `log_nested_statements` logs each of them with its actual
rows, loops and buffers; at `log_level = notice` the plans arrive at the
client as notices, which `nested_plans` collects:

    with nested_plans(conn) as plans:
        conn.execute("select * from flakectl.process_commit(1, 'abc')")
    for plan in plans: ...            # Plan objects, in execution order

Loading auto_explain needs superuser (or the library in
session_preload_libraries).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg

SCAN_NODES = frozenset({"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan",
                        "Tid Scan", "Tid Range Scan", "Sample Scan"})


@dataclass
class Plan:
    """One logged statement: its text, duration and plan (JSON tree or text)."""

    query: str
    duration_ms: float
    tree: dict | None = None  # format json
    text: str = ""  # format text
    extra: dict = field(default_factory=dict)

    def nodes(self) -> Iterator[dict]:
        """Every node of the plan tree, depth first (JSON format only)."""
        stack = [self.tree["Plan"]] if self.tree else []
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.get("Plans", [])))


def rows_read(node: dict) -> float:
    """The heap rows a scan node looked at: the rows it returned plus those its
    filter and index recheck dropped (EXPLAIN gives these per loop), times its loops."""
    per_loop = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                + node.get("Rows Removed by Index Recheck", 0))
    return per_loop * node.get("Actual Loops", 0)


def relation_rows(plans: list[Plan], relations: set[str]) -> dict[str, float]:
    """Rows read by the scan nodes of `relations` (names, not schema-qualified), by relation."""
    out: dict[str, float] = {}
    for plan in plans:
        for node in plan.nodes():
            name = node.get("Relation Name")
            if node.get("Node Type") in SCAN_NODES and name in relations:
                out[name] = out.get(name, 0.0) + rows_read(node)
    return out


@contextmanager
def nested_plans(conn: psycopg.Connection, *, fmt: str = "json", analyze: bool = True,
                 buffers: bool = True) -> Iterator[list[Plan]]:
    """Collect the plan of every statement run inside the block, nested ones included."""
    plans: list[Plan] = []

    def handler(diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        if not message.startswith("duration:") or "plan:" not in message:
            return
        head, _, body = message.partition("plan:\n")
        duration = float(head.split()[1])
        if fmt == "json":
            tree = json.loads(body)
            plans.append(Plan(query=tree.get("Query Text", ""), duration_ms=duration, tree=tree))
        else:
            plans.append(Plan(query="", duration_ms=duration, text=body))

    # log_min_duration last on, first off: the set_config calls themselves are not logged
    settings = {
        "auto_explain.log_analyze": "on" if analyze else "off",
        "auto_explain.log_buffers": "on" if buffers and analyze else "off",
        "auto_explain.log_timing": "on",
        "auto_explain.log_nested_statements": "on",
        "auto_explain.log_format": fmt,
        "auto_explain.log_level": "notice",
        "client_min_messages": "notice",
        "auto_explain.log_min_duration": "0",
    }
    conn.execute("load 'auto_explain'")
    saved = {name: conn.execute("select current_setting(%s)", (name,)).fetchone()[0]
             for name in settings}
    for name, value in settings.items():
        conn.execute("select set_config(%s, %s, false)", (name, value))
    conn.add_notice_handler(handler)
    try:
        yield plans
    finally:
        conn.remove_notice_handler(handler)
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
            for name, value in reversed(saved.items()):
                conn.execute("select set_config(%s, %s, false)", (name, value))


__all__ = ["Plan", "SCAN_NODES", "nested_plans", "relation_rows", "rows_read"]
