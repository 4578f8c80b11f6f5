"""ttrpc, containerd's lightweight RPC protocol: sans-I/O framing and stream state, plus asyncio
server and client over any stream transport (unix socket, vsock, hybrid vsock)."""

from .client import ClientStream, TtrpcClient
from .connection import (
    MAX_STREAM_ID,
    ClientConnection,
    Event,
    MessageRefused,
    NewRequest,
    ResponseReceived,
    ServerConnection,
    StreamClosed,
    StreamData,
    status_response,
)
from .frames import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    NO_FLAGS,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    ProtocolError,
    encode_frame,
)
from .inbox import STREAM_FULL_TIMEOUT, STREAM_RECV_BUFFER
from .server import NAMESPACE_KEY, Context, ServerStream, StreamHandler, TtrpcServer, UnaryHandler

__all__ = [
    "HEADER_SIZE", "MAX_MESSAGE_SIZE", "MAX_STREAM_ID", "NAMESPACE_KEY", "NO_FLAGS", "STREAM_FULL_TIMEOUT",
    "STREAM_RECV_BUFFER", "ClientConnection", "ClientStream", "Context", "Event", "Flag", "Frame",
    "FrameDecoder", "FrameType", "MessageRefused", "NewRequest", "OversizedFrame", "ProtocolError",
    "ResponseReceived", "ServerConnection", "ServerStream", "StreamClosed", "StreamData", "StreamHandler",
    "TtrpcClient", "TtrpcServer", "UnaryHandler", "encode_frame", "status_response",
]
