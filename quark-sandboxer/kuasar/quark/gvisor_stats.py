"""A container's `runsc events --stats` (the sentry's own accounting) as containerd's cgroup Metrics.

Every process of a gVisor pod lives inside one host process, so host cgroups cannot tell the pod's
containers apart; the sentry can. containerd decodes Task.Stats by type URL, so the numbers are
packed in the shape of the host's cgroup version, which is what it expects from any runtime here.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2

from kuasar.common import cgroups
from kuasar.common.api.containerd.cgroups.v1 import metrics_pb2 as v1
from kuasar.common.api.containerd.cgroups.v2 import metrics_pb2 as v2


def _int(data: dict[str, Any], *path: str) -> int:
    value: Any = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return int(value) if isinstance(value, int | float) and value > 0 else 0


def to_metrics(data: dict[str, Any]) -> any_pb2.Any:
    if cgroups.is_unified():
        m2 = v2.Metrics()
        m2.cpu.usage_usec = _int(data, "cpu", "usage", "total") // 1000
        m2.cpu.user_usec = _int(data, "cpu", "usage", "user") // 1000
        m2.cpu.system_usec = _int(data, "cpu", "usage", "kernel") // 1000
        m2.memory.usage = _int(data, "memory", "usage", "usage")
        m2.memory.usage_limit = _int(data, "memory", "usage", "limit")
        m2.memory.file = _int(data, "memory", "cache")
        m2.pids.current = _int(data, "pids", "current")
        m2.pids.limit = _int(data, "pids", "limit")
        return any_pb2.Any(type_url=cgroups.V2_TYPE_URL, value=m2.SerializeToString())
    m1 = v1.Metrics()
    m1.cpu.usage.total = _int(data, "cpu", "usage", "total")
    m1.cpu.usage.user = _int(data, "cpu", "usage", "user")
    m1.cpu.usage.kernel = _int(data, "cpu", "usage", "kernel")
    per_cpu = data.get("cpu", {}).get("usage", {}).get("percpu") or []
    m1.cpu.usage.per_cpu.extend(int(v) for v in per_cpu if isinstance(v, int))
    m1.memory.usage.usage = _int(data, "memory", "usage", "usage")
    m1.memory.usage.limit = _int(data, "memory", "usage", "limit")
    m1.memory.usage.max = _int(data, "memory", "usage", "max")
    m1.memory.usage.failcnt = _int(data, "memory", "usage", "failcnt")
    m1.memory.cache = _int(data, "memory", "cache")
    m1.pids.current = _int(data, "pids", "current")
    m1.pids.limit = _int(data, "pids", "limit")
    return any_pb2.Any(type_url=cgroups.V1_TYPE_URL, value=m1.SerializeToString())
