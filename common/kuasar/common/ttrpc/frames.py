"""ttrpc framing: a 10-byte header plus payload, encoded and decoded without any I/O.

Header layout (big-endian): uint32 payload length, uint32 stream id, uint8 type, uint8 flags.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kuasar.common.errors import Code, KuasarError

HEADER_SIZE = 10
_HEADER = struct.Struct(">IIBB")
assert _HEADER.size == HEADER_SIZE
_LENGTH_AND_STREAM = struct.Struct(">II")

# The limit every ttrpc implementation (Go `messageLengthMax`, Rust `MESSAGE_LENGTH_MAX`) enforces.
# Peers reject anything larger, so sending more is pointless, and accepting more would let one
# header make us buffer up to 4 GiB. Being below 16 MiB also keeps the first header byte zero,
# which the protocol reserves for future use.
MAX_MESSAGE_SIZE = 4 << 20


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flag(enum.IntFlag):
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


NO_FLAGS = Flag(0)
# The flag bits we know; others are ignored (a later version's, as Go's ttrpc ignores them).
_KNOWN_FLAGS = int(Flag.REMOTE_CLOSED | Flag.REMOTE_OPEN | Flag.NO_DATA)


class ProtocolError(KuasarError):
    """The peer broke the ttrpc protocol; the connection cannot be trusted any more.

    `stream_id` is set when the offending frame named one, so the status can be sent back on it
    (as Go does) before the connection is closed.
    """

    def __init__(self, message: str, code: Code = Code.INVALID_ARGUMENT,
                 stream_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.stream_id = stream_id


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: FrameType
    flags: Flag = NO_FLAGS
    payload: bytes = b""


@dataclass(frozen=True)
class OversizedFrame:
    """A frame longer than MAX_MESSAGE_SIZE. Its payload is dropped as it arrives, never kept, and
    the connection goes on: like Go's ttrpc, the peer answers the stream it named with `message`
    (RESOURCE_EXHAUSTED) instead of dropping every other call on the connection."""

    stream_id: int
    length: int

    @property
    def message(self) -> str:
        return _too_long(self.length)


def _too_long(length: int) -> str:
    # Go's words, so clients see a familiar error.
    return f"message length {length} exceed maximum message size of {MAX_MESSAGE_SIZE}"


def encode_frame(frame: Frame) -> bytes:
    """Header plus payload; refuses payloads the peer would reject anyway."""
    size = len(frame.payload)
    if size > MAX_MESSAGE_SIZE:
        raise ProtocolError(_too_long(size), Code.RESOURCE_EXHAUSTED, frame.stream_id)
    return _HEADER.pack(size, frame.stream_id, frame.type, frame.flags) + frame.payload


class FrameDecoder:
    """Turns a byte stream into frames (and OversizedFrame for each frame over the limit). After the
    first error every later call raises it again."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, FrameType, Flag] | None = None
        self._skip = 0  # payload bytes of an oversized frame still to be dropped
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back; non-zero at EOF means the peer truncated it."""
        return len(self._buf) + (HEADER_SIZE if self._header else 0)

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        if self._error:
            raise self._error
        self._buf += data  # a read's worth at most (64 KiB): what is skipped goes again below
        frames: list[Frame | OversizedFrame] = []
        try:
            while True:
                if self._skip:
                    dropped = min(self._skip, len(self._buf))
                    del self._buf[:dropped]
                    self._skip -= dropped
                    if self._skip:
                        break
                if self._header is None:
                    if len(self._buf) < HEADER_SIZE:
                        break
                    raw = bytes(self._buf[:HEADER_SIZE])
                    del self._buf[:HEADER_SIZE]
                    # Checked before anything else in the header, as Go does: the length decides how
                    # many bytes belong to this frame, whatever else is wrong with it.
                    length, stream_id = _LENGTH_AND_STREAM.unpack(raw[:8])
                    if length > MAX_MESSAGE_SIZE:
                        self._skip = length
                        frames.append(OversizedFrame(stream_id, length))
                        continue
                    if raw[8] not in FrameType._value2member_map_:
                        # As Go's ttrpc: a type we do not know (a later version's) is skipped, for
                        # peers of different versions to get along; its payload is never kept.
                        self._skip = length
                        continue
                    self._header = _parse_header(raw)
                length, stream_id, ftype, flags = self._header
                if len(self._buf) < length:
                    break
                payload = bytes(self._buf[:length])
                del self._buf[:length]
                self._header = None
                frames.append(Frame(stream_id, ftype, flags, payload))
        except ProtocolError as err:
            self._error = err
            self._buf.clear()
            raise
        return frames

    def eof(self) -> None:
        """Call when the peer closed; raises if it stopped in the middle of a frame."""
        if self._error:
            raise self._error
        if self._skip:  # its stream was answered when the header came: no stream to blame now
            self._error = ProtocolError(f"connection closed with {self._skip} bytes of an oversized "
                                        f"frame still to come", Code.DATA_LOSS)
            raise self._error
        if self.pending:
            stream_id = self._header[1] if self._header else None
            self._error = ProtocolError(f"connection closed with {self.pending} bytes of a partial frame",
                                        Code.DATA_LOSS, stream_id)
            raise self._error


def _parse_header(raw: bytes) -> tuple[int, int, FrameType, Flag]:
    length, stream_id, ftype, flags = _HEADER.unpack(raw)
    # Flag bits no version we know defines are ignored, as Go's ttrpc does.
    return length, stream_id, FrameType(ftype), Flag(flags & _KNOWN_FLAGS)
