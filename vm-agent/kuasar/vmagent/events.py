"""Task events kept for the host, which pulls them with the server-streaming `Agent/Events` call.

Same `publish(topic, event, namespace)` shape as kuasar.common.events.EventPublisher, but instead
of dialing containerd the agent queues envelopes (bounded, oldest dropped) until a host stream
takes them. One consumer at a time: a newer `Events` call replaces the older one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from google.protobuf import any_pb2
from google.protobuf.message import Message

from kuasar.common.api.containerd.types import event_pb2

MAX_QUEUED_EVENTS = 1024
DEFAULT_NAMESPACE = "k8s.io"


class EventQueue:
    def __init__(self, limit: int = MAX_QUEUED_EVENTS) -> None:
        self._items: deque[event_pb2.Envelope] = deque()
        self._limit = limit
        self._readable = asyncio.Event()
        self.dropped = 0
        self._consumer = 0

    def publish(self, topic: str, event: Message, namespace: str = "") -> None:
        envelope = event_pb2.Envelope(namespace=namespace or DEFAULT_NAMESPACE, topic=topic,
                                      event=any_pb2.Any(type_url=event.DESCRIPTOR.full_name,
                                                        value=event.SerializeToString()))
        envelope.timestamp.FromNanoseconds(time.time_ns())
        if len(self._items) >= self._limit:
            self._items.popleft()
            self.dropped += 1
        self._items.append(envelope)
        self._readable.set()

    def __len__(self) -> int:
        return len(self._items)

    def take_over(self) -> int:
        """Become the consumer; returns a token that stops `get` for earlier consumers."""
        self._consumer += 1
        self._readable.set()  # wake the previous consumer so it notices
        return self._consumer

    async def get(self, token: int) -> event_pb2.Envelope | None:
        """The oldest undelivered event; None when a newer consumer took over."""
        while True:
            if token != self._consumer:
                return None
            if self._items:
                return self._items[0]
            self._readable.clear()
            await self._readable.wait()

    def delivered(self, envelope: event_pb2.Envelope) -> None:
        """Drop an event once it was sent (it stays queued if the send failed)."""
        if self._items and self._items[0] is envelope:
            self._items.popleft()
