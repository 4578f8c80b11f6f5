"""The OCI spec Kuasar writes into a Quark sandbox bundle, synthesised from CRI's PodSandboxConfig.

Quark reads `<base>/sandbox/config.json` when `quark ... sandbox` starts the pod's VM: resources from
`linux.resources` (memory limit always present, swap, cpu shares/quota/period only when positive, cpuset
strings, hugepage limits), the pod's network namespace by path, a default process and `root.path`
relative to the bundle (`rootfs`, holding only `dev/`).
"""

from __future__ import annotations

from typing import Any

from kuasar.common.api.runtime.v1 import api_pb2 as cri

DEFAULT_PROCESS: dict[str, Any] = {
    "terminal": False,
    "user": {"uid": 0, "gid": 0},
    "args": [],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/",
}


def sandbox_spec(config: cri.PodSandboxConfig, netns_path: str) -> dict[str, Any]:
    linux: dict[str, Any] = {}
    if config.linux.HasField("resources"):
        r = config.linux.resources
        memory: dict[str, Any] = {"limit": r.memory_limit_in_bytes}
        if r.memory_swap_limit_in_bytes > 0:
            memory["swap"] = r.memory_swap_limit_in_bytes
        cpu: dict[str, Any] = {}
        if r.cpu_shares > 0:
            cpu["shares"] = r.cpu_shares
        if r.cpu_quota > 0:
            cpu["quota"] = r.cpu_quota
        if r.cpu_period > 0:
            cpu["period"] = r.cpu_period
        if r.cpuset_cpus:
            cpu["cpus"] = r.cpuset_cpus
        if r.cpuset_mems:
            cpu["mems"] = r.cpuset_mems
        resources: dict[str, Any] = {"memory": memory}
        if cpu:
            resources["cpu"] = cpu
        if r.hugepage_limits:
            resources["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits]
        linux["resources"] = resources
    if netns_path:
        linux["namespaces"] = [{"type": "network", "path": netns_path}]
    if config.linux.cgroup_parent:
        linux["cgroupsPath"] = config.linux.cgroup_parent
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": dict(DEFAULT_PROCESS),
        "root": {"path": "rootfs"},
        "hostname": config.hostname,
        "linux": linux,
    }
    return spec
