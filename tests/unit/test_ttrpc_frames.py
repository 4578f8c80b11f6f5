"""ttrpc framing against hand-written bytes: what goes on the wire, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kuasar.common.errors import Code
from kuasar.common.ttrpc import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    ProtocolError,
    encode_frame,
)

PAYLOAD = b"hello"
REQUEST_BYTES = b"\x00\x00\x00\x05" b"\x00\x00\x00\x01" b"\x01\x00" + PAYLOAD
RESPONSE_BYTES = b"\x00\x00\x00\x02" b"\x00\x00\x00\x03" b"\x02\x00" + b"\x08\x05"
DATA_END_BYTES = b"\x00\x00\x00\x00" b"\x00\x00\x00\x07" b"\x03\x05"


def test_header_is_ten_bytes_and_limit_is_four_mib() -> None:
    assert HEADER_SIZE == 10
    assert MAX_MESSAGE_SIZE == 4 * 1024 * 1024


def test_encode_request_frame_matches_hand_written_bytes() -> None:
    assert encode_frame(Frame(1, FrameType.REQUEST, Flag(0), PAYLOAD)) == REQUEST_BYTES


def test_encode_response_frame_matches_hand_written_bytes() -> None:
    assert encode_frame(Frame(3, FrameType.RESPONSE, Flag(0), b"\x08\x05")) == RESPONSE_BYTES


def test_encode_end_of_stream_data_frame_is_flags_0x05_and_no_payload() -> None:
    frame = Frame(7, FrameType.DATA, Flag.REMOTE_CLOSED | Flag.NO_DATA)
    assert encode_frame(frame) == DATA_END_BYTES


def test_encode_large_stream_id_is_big_endian() -> None:
    raw = encode_frame(Frame(0x01020305, FrameType.DATA, Flag.REMOTE_OPEN, b""))
    assert raw == b"\x00\x00\x00\x00\x01\x02\x03\x05\x03\x02"


def test_encode_refuses_payload_over_the_limit() -> None:
    with pytest.raises(ProtocolError) as info:
        encode_frame(Frame(1, FrameType.DATA, Flag(0), b"\0" * (MAX_MESSAGE_SIZE + 1)))
    assert info.value.code == Code.RESOURCE_EXHAUSTED


def test_encode_accepts_payload_exactly_at_the_limit() -> None:
    raw = encode_frame(Frame(1, FrameType.DATA, Flag(0), b"\0" * MAX_MESSAGE_SIZE))
    assert raw[:4] == b"\x00\x40\x00\x00"


def test_decode_request_frame() -> None:
    assert FrameDecoder().feed(REQUEST_BYTES) == [Frame(1, FrameType.REQUEST, Flag(0), PAYLOAD)]


def test_decode_data_frame_flags_are_typed() -> None:
    (frame,) = FrameDecoder().feed(DATA_END_BYTES)
    assert frame.type is FrameType.DATA
    assert frame.flags == Flag.REMOTE_CLOSED | Flag.NO_DATA
    assert frame.payload == b""


def test_decode_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(REQUEST_BYTES)):
        frames += decoder.feed(REQUEST_BYTES[i:i + 1])
        if i < len(REQUEST_BYTES) - 1:
            assert frames == []
            assert decoder.pending == i + 1
    assert frames == [Frame(1, FrameType.REQUEST, Flag(0), PAYLOAD)]
    assert decoder.pending == 0
    decoder.eof()  # nothing pending: a clean end


def test_decode_several_frames_in_one_chunk() -> None:
    frames = FrameDecoder().feed(REQUEST_BYTES + RESPONSE_BYTES + DATA_END_BYTES)
    assert [(f.stream_id, f.type) for f in frames] == [
        (1, FrameType.REQUEST), (3, FrameType.RESPONSE), (7, FrameType.DATA)]


def test_decode_zero_length_data_without_no_data_flag_is_an_empty_message() -> None:
    (frame,) = FrameDecoder().feed(b"\x00\x00\x00\x00\x00\x00\x00\x01\x03\x00")
    assert frame == Frame(1, FrameType.DATA, Flag(0), b"")


def test_decode_reports_an_oversized_frame_at_its_header_and_keeps_none_of_its_payload() -> None:
    decoder = FrameDecoder()
    length = MAX_MESSAGE_SIZE + 5
    # Type 7 and flag 0x80 are unknown too: the length is checked first, as Go does, so that the
    # frame's bytes are skipped whatever else is wrong with it.
    header = length.to_bytes(4, "big") + b"\x00\x00\x00\x09\x07\x80"
    (refused,) = decoder.feed(header)  # no payload byte has been sent yet
    assert refused == OversizedFrame(9, length)
    assert refused.message == "message length 4194309 exceed maximum message size of 4194304"
    assert decoder.feed(b"\xff" * MAX_MESSAGE_SIZE) == []
    assert decoder.pending == 0  # skipped, not held
    following = b"\x00\x00\x00\x02\x00\x00\x00\x0b\x01\x00hi"
    # The payload's last 5 bytes and the next frame arrive in one read.
    assert decoder.feed(b"\xff" * 5 + following) == [Frame(11, FrameType.REQUEST, Flag(0), b"hi")]


def test_decode_skips_an_oversized_payload_split_over_reads_and_in_the_same_read() -> None:
    length = MAX_MESSAGE_SIZE + 1
    raw = (length.to_bytes(4, "big") + b"\x00\x00\x00\x03\x03\x00" + b"\x00" * length
           + b"\x00\x00\x00\x01\x00\x00\x00\x05\x03\x00z")
    whole = FrameDecoder().feed(raw)
    assert whole == [OversizedFrame(3, length), Frame(5, FrameType.DATA, Flag(0), b"z")]
    decoder, pieces = FrameDecoder(), []
    for start in range(0, len(raw), 1 << 20):
        pieces += decoder.feed(raw[start:start + (1 << 20)])
    assert pieces == whole


def test_eof_in_an_oversized_payload_is_data_loss_on_no_stream() -> None:
    decoder = FrameDecoder()
    decoder.feed((MAX_MESSAGE_SIZE + 1).to_bytes(4, "big") + b"\x00\x00\x00\x09\x01\x00" + b"\x00" * 10)
    with pytest.raises(ProtocolError) as info:
        decoder.eof()
    assert info.value.code == Code.DATA_LOSS
    assert info.value.stream_id is None  # its status went out when the header came


def test_a_frame_of_unknown_type_is_skipped_whole_even_across_reads() -> None:
    # As Go's ttrpc, for peers of later versions (a control frame type, say): it closed the connection.
    unknown = b"\x00\x00\x00\x05\x00\x00\x00\x01\x04\x00" + b"hello"
    assert FrameDecoder().feed(unknown + REQUEST_BYTES) == FrameDecoder().feed(REQUEST_BYTES)
    decoder = FrameDecoder()
    assert decoder.feed(unknown[:12]) == []
    assert decoder.feed(unknown[12:] + REQUEST_BYTES) == FrameDecoder().feed(REQUEST_BYTES)
    decoder.eof()  # nothing left over


def test_unknown_flag_bits_are_ignored() -> None:
    (frame,) = FrameDecoder().feed(b"\x00\x00\x00\x00\x00\x00\x00\x01\x03\x0d")
    assert frame.flags == Flag.REMOTE_CLOSED | Flag.NO_DATA


def test_decoder_refuses_to_continue_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(REQUEST_BYTES[:5])
    with pytest.raises(ProtocolError):
        decoder.eof()
    with pytest.raises(ProtocolError):
        decoder.feed(REQUEST_BYTES)


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, len(REQUEST_BYTES) - 1])
def test_eof_inside_a_frame_is_truncation(cut: int) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(REQUEST_BYTES[:cut]) == []
    assert decoder.pending == cut
    with pytest.raises(ProtocolError) as info:
        decoder.eof()
    assert info.value.code == Code.DATA_LOSS


frames_strategy = st.lists(st.builds(
    Frame,
    stream_id=st.integers(0, 0xFFFF_FFFF),
    type=st.sampled_from(list(FrameType)),
    flags=st.sampled_from([Flag(v) for v in range(8)]),
    payload=st.binary(max_size=64),
), max_size=8)


@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_any_chunking_decodes_to_the_frames_encoded(frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(wire)) + [len(wire)]:
        out += decoder.feed(wire[start:cut])
        start = cut
    decoder.eof()
    assert out == frames
