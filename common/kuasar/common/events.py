"""Publish `/tasks/*` events to containerd's ttrpc Events/Forward without ever blocking a task.

Events are optional for CRI (it learns exits from Task.Wait) but `ctr events`, OOM reasons and
GetContainerEvents consumers need them. A bounded queue drained by one background task means a slow
or absent containerd costs dropped events, never a stuck Create or Kill.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from .api.containerd.events import task_pb2 as task_events
from .api.containerd.services.events.ttrpc.v1 import events_pb2
from .errors import Code, KuasarError
from .ttrpc import TtrpcClient

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
DEFAULT_NAMESPACE = "k8s.io"
# The topic containerd's shims publish each task event under (runtime v2's task service), by type: ours
# publish under it, and a VM guest's events are forwarded only if they are one of these, under it.
TASK_EVENT_TOPICS: dict[type[Message], str] = {
    task_events.TaskCreate: "/tasks/create",
    task_events.TaskStart: "/tasks/start",
    task_events.TaskDelete: "/tasks/delete",
    task_events.TaskExit: "/tasks/exit",
    task_events.TaskOOM: "/tasks/oom",
    task_events.TaskExecAdded: "/tasks/exec-added",
    task_events.TaskExecStarted: "/tasks/exec-started",
    task_events.TaskPaused: "/tasks/paused",
    task_events.TaskResumed: "/tasks/resumed",
    task_events.TaskCheckpointed: "/tasks/checkpointed",
}
# Enough for a burst of pod churn; past it the oldest events are dropped (and counted).
MAX_QUEUED_EVENTS = 1024
FORWARD_TIMEOUT = 5.0
RECONNECT_DELAY = 1.0
# Answers that say this event will never be taken (a bad topic or namespace, no Events service): sent
# again it would be refused again, and every event behind it (a task's exit) would wait forever.
REFUSALS = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.PERMISSION_DENIED,
                      Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.UNIMPLEMENTED, Code.UNAUTHENTICATED})


class EventPublisher:
    def __init__(self, address: str) -> None:
        self.address = address.removeprefix("unix://")
        self.dropped = 0
        self.sent = 0
        self._queue: asyncio.Queue[events_pb2.ForwardRequest] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def publish(self, topic: str, event: Message, namespace: str = "") -> None:
        if not self.enabled:
            return
        request = events_pb2.ForwardRequest()
        envelope = request.envelope
        envelope.timestamp.CopyFrom(_now())
        envelope.namespace = namespace or DEFAULT_NAMESPACE
        envelope.topic = topic
        envelope.event.CopyFrom(any_pb2.Any(type_url=event.DESCRIPTOR.full_name,
                                            value=event.SerializeToString()))
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(request)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="event-publisher")

    async def _drain(self) -> None:
        client: TtrpcClient | None = None
        try:
            while True:
                request = await self._queue.get()
                while True:
                    try:
                        if client is None:
                            client = await TtrpcClient.connect_unix(self.address)
                        await client.call(EVENTS_SERVICE, "Forward", request, timeout=FORWARD_TIMEOUT,
                                          metadata={NAMESPACE_KEY: request.envelope.namespace})
                        self.sent += 1
                        break
                    except Exception as exc:  # noqa: BLE001 - a refusal is dropped, anything else retried
                        if isinstance(exc, KuasarError) and exc.code in REFUSALS:
                            log.error("event %s refused by containerd, dropped: %s", request.envelope.topic, exc)
                            self.dropped += 1
                            break
                        log.debug("event %s not forwarded yet: %s", request.envelope.topic, exc)
                        if client is not None:
                            await client.close()
                            client = None
                        await asyncio.sleep(RECONNECT_DELAY)
        finally:
            if client is not None:
                await client.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts
