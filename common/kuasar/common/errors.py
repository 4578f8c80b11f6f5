"""Typed errors, mapped to gRPC/ttrpc status codes in one place (the API edges read `.code`)."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes; ttrpc uses the same numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class KuasarError(Exception):
    """Base of every error that crosses an API edge with a definite status code."""

    code: Code = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Cancelled(KuasarError):
    code = Code.CANCELLED


class InvalidArgument(KuasarError):
    code = Code.INVALID_ARGUMENT


class NotFound(KuasarError):
    code = Code.NOT_FOUND


class AlreadyExists(KuasarError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(KuasarError):
    code = Code.FAILED_PRECONDITION


class Unimplemented(KuasarError):
    code = Code.UNIMPLEMENTED


class Unavailable(KuasarError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(KuasarError):
    code = Code.DEADLINE_EXCEEDED


class ResourceExhausted(KuasarError):
    code = Code.RESOURCE_EXHAUSTED


class Internal(KuasarError):
    code = Code.INTERNAL


class RuntimeFailure(KuasarError):
    """An external runtime (runc, QEMU, ...) failed; the message carries its own words."""

    code = Code.UNKNOWN


def from_code(code: int, message: str) -> KuasarError:
    """Rebuild a typed error from a status received over the wire."""
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unimplemented,
                Unavailable, DeadlineExceeded, ResourceExhausted, Internal):
        if cls.code == code:
            return cls(message)
    err = KuasarError(message)
    err.code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN
    return err
