"""Durations as people type them on a command line: `1d`, `12h`, `30m`,
`90s`, `2w`, or a sum such as `1d12h`."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_PART = re.compile(r"(\d+)([wdhms])")
_WHOLE = re.compile(r"(?:\d+[wdhms])+")

EXAMPLES = "1d, 12h, 30m, 90s, 2w or 1d12h"


def parse_duration(text: str) -> timedelta:
    """`text` as a timedelta; ValueError saying what a duration looks like."""
    compact = text.strip().lower().replace(" ", "")
    if not _WHOLE.fullmatch(compact):
        raise ValueError(f"invalid duration {text!r}: use a number and a unit (w, d, h, m, s), e.g. {EXAMPLES}")
    total = timedelta()
    try:
        for number, unit in _PART.findall(compact):
            total += timedelta(**{_UNITS[unit]: int(number)})
    except OverflowError:
        # timedelta's own limit; PostgreSQL would take more, but no window or
        # age needs it: past the earliest timestamp a lookback is no bound at all
        raise ValueError(f"duration {text!r} is too large: at most {timedelta.max.days}d") from None
    return total


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling in the units parse_duration reads: 2d, 36h, 90s."""
    seconds = int(value.total_seconds())
    if seconds != value.total_seconds() or seconds < 0:
        return str(value)
    if seconds == 0:
        return "0s"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: every whole number of seconds is a multiple of 1")
