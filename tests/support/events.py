"""A stand-in for a task server's EventPublisher that keeps the topics published, in order."""

from __future__ import annotations


class RecordedEvents:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, event: object, namespace: str = "") -> None:
        self.topics.append(topic)
