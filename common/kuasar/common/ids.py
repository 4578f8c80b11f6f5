"""Identifier validation: every id that reaches a path, a cgroup or a command line passes here first."""

from __future__ import annotations

import re

from .errors import InvalidArgument

# containerd's own identifier rule (pkg/identifiers): alphanumerics joined by single `.`, `_` or `-`.
# It cannot contain `/`, start with `.` or be `..`, so an id is always one safe path component.
_ID_RE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
# containerd caps identifiers at 76 characters (a 64-hex CRI id plus room for a suffix).
MAX_ID_LENGTH = 76


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe identifier, else raise InvalidArgument naming what was wrong."""
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} is {len(value)} characters long, more than {MAX_ID_LENGTH}")
    if not _ID_RE.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r} is not a valid identifier "
                              "(letters and digits joined by single '.', '_' or '-')")
    return value
