"""Tables for humans, JSON for scripts, and the small formatting helpers both need."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

SHORT_ID = 13  # crictl's truncated id width


def short_id(value: str, no_trunc: bool = False) -> str:
    return value if no_trunc else value[:SHORT_ID]


def to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON-ready data, with the .proto field names (as crictl -o json does)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(data, out, indent=2, sort_keys=True)
    out.write("\n")


def age(timestamp_ns: int, now_ns: int | None = None) -> str:
    """"5 seconds ago", "3 minutes ago", ... like crictl's CREATED column."""
    if timestamp_ns <= 0:
        return "-"
    seconds = max(0, ((now_ns if now_ns is not None else time.time_ns()) - timestamp_ns) // 1_000_000_000)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    if seconds < 1:
        return "Less than a second ago"
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.3g}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None) -> None:
    """Left-aligned columns separated by three spaces; the last column is not padded."""
    out = out or sys.stdout
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in [list(headers), *text_rows]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        out.write("   ".join(cells).rstrip() + "\n")
