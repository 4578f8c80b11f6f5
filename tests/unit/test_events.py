"""EventPublisher against a ttrpc Events service that takes some events and refuses others."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from google.protobuf import empty_pb2

from kuasar.common import events
from kuasar.common.api.containerd.events import task_pb2 as task_events
from kuasar.common.api.containerd.services.events.ttrpc.v1 import events_pb2
from kuasar.common.errors import InvalidArgument, Unavailable
from kuasar.common.ttrpc import Context, TtrpcServer


class EventsService:
    """Refuses one topic for good and fails another once, as a restarting containerd would."""

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.failed_once = False
        self.exit_arrived = asyncio.Event()

    async def forward(self, request: events_pb2.ForwardRequest, ctx: Context) -> empty_pb2.Empty:
        topic = request.envelope.topic
        if topic == "/tasks/refused":
            raise InvalidArgument("topic refused")
        if topic == "/tasks/flaky" and not self.failed_once:
            self.failed_once = True
            raise Unavailable("starting up")
        self.topics.append(topic)
        if topic == "/tasks/exit":
            self.exit_arrived.set()
        return empty_pb2.Empty()


def test_a_refused_event_is_dropped_and_the_events_behind_it_still_go(monkeypatch) -> None:
    monkeypatch.setattr(events, "RECONNECT_DELAY", 0.01)
    directory = Path(tempfile.mkdtemp(prefix="ev", dir="/tmp"))  # a short path for the socket

    async def main() -> None:
        service = EventsService()
        server = TtrpcServer()
        server.add_unary(events.EVENTS_SERVICE, "Forward", events_pb2.ForwardRequest, service.forward)
        await server.start_unix(str(directory / "events.sock"))
        publisher = events.EventPublisher(str(directory / "events.sock"))
        try:
            for topic in ("/tasks/refused", "/tasks/flaky", "/tasks/exit"):
                publisher.publish(topic, task_events.TaskExit(container_id="c"))
            async with asyncio.timeout(10):
                await service.exit_arrived.wait()
            assert service.topics == ["/tasks/flaky", "/tasks/exit"]  # the transient failure was retried
            assert publisher.dropped == 1
        finally:
            await publisher.close()
            await server.close()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
