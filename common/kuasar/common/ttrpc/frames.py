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
# Bits no ttrpc version defines; a peer setting them speaks something we do not understand.
# (A plain int: `~` on an IntFlag would invert only within the defined bits.)
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


def encode_frame(frame: Frame) -> bytes:
    """Header plus payload; refuses payloads the peer would reject anyway."""
    size = len(frame.payload)
    if size > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message length {size} exceed maximum message size of {MAX_MESSAGE_SIZE}",
                            Code.RESOURCE_EXHAUSTED, frame.stream_id)
    return _HEADER.pack(size, frame.stream_id, frame.type, frame.flags) + frame.payload


class FrameDecoder:
    """Turns a byte stream into frames. After the first error every later call raises it again."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, FrameType, Flag] | None = None
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back; non-zero at EOF means the peer truncated it."""
        return len(self._buf) + (HEADER_SIZE if self._header else 0)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        try:
            while True:
                if self._header is None:
                    if len(self._buf) < HEADER_SIZE:
                        break
                    # Validate as soon as the header is in: an oversized length is refused
                    # before a single payload byte is buffered.
                    self._header = _parse_header(bytes(self._buf[:HEADER_SIZE]))
                    del self._buf[:HEADER_SIZE]
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
        if self.pending:
            stream_id = self._header[1] if self._header else None
            self._error = ProtocolError(f"connection closed with {self.pending} bytes of a partial frame",
                                        Code.DATA_LOSS, stream_id)
            raise self._error


def _parse_header(raw: bytes) -> tuple[int, int, FrameType, Flag]:
    length, stream_id, ftype, flags = _HEADER.unpack(raw)
    if length > MAX_MESSAGE_SIZE:
        # Same status and words as Go, so clients see a familiar error.
        raise ProtocolError(f"message length {length} exceed maximum message size of {MAX_MESSAGE_SIZE}",
                            Code.RESOURCE_EXHAUSTED, stream_id)
    if ftype not in FrameType._value2member_map_:
        raise ProtocolError(f"unknown message type {ftype:#x}", Code.INVALID_ARGUMENT, stream_id)
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags {flags:#x}", Code.INVALID_ARGUMENT, stream_id)
    return length, stream_id, FrameType(ftype), Flag(flags)
