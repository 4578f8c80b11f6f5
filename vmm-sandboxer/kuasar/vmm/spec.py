"""Rewrite the OCI spec CRI generated on the host into one runc can use inside the pod's VM.

CRI writes the spec for a host runtime: namespaces point at `/proc/<pod pid>/ns/*` (here the QEMU
process), mounts name host paths, the cgroup path and cpuset are the host's. In the VM:

* **namespaces**: the guest's root network namespace *is* the pod network (the NIC was copied in),
  so `network` is dropped; `ipc`/`uts` that CRI wants shared through a path are dropped too, i.e.
  shared with the guest, whose hostname is the pod's. A shared `pid` namespace is the pod's own in the
  guest (`GUEST_POD_PID_NS`, made by the agent's SetupSandbox): the containers see each other and
  the pod process as PID 1, not the agent. Another container's (`kubectl debug --target`: CRI names
  it by the pid our Task API gave, a guest pid) stays as it is, valid in the guest. Namespaces without
  a path stay private (new).
  `mount`/`cgroup` stay new; a `user` namespace path is dropped.
* **mounts**: binds whose source is a host file or directory are shared through the VM's shared
  directory (the proxy binds each host path there once for the pod, see proxy.HostPrep), kubelet's own
  `/etc/hosts` (its hostAliases, the pod's FQDN) among them; where CRI mounted no `/etc/hosts`,
  `/etc/hostname` or `/etc/resolv.conf` (containerd mounts its own only for its own sandboxes) the
  guest's are added (written by SetupSandbox from the pod's hostname and DNS config), read-only with
  a read-only rootfs as containerd adds them; `/dev/shm` is the guest's pod-wide shm (in place of
  the private tmpfs of containerd's default spec too); propagation is
  made private (9p cannot propagate). proc/sysfs/tmpfs/devpts/mqueue/cgroup mounts are kept: they
  are made in the guest (an emptyDir of medium Memory is such a tmpfs).
* **paths**: `root.path` -> `rootfs` in the guest bundle; `linux.cgroupsPath` -> `/kuasar/<id>`
  (one guest cgroup for the pod's containers, read for sandbox metrics).
* **host-only settings**: cpuset cpus/mems (host CPU numbers), `linux.devices` (host devices),
  hooks (host binaries), AppArmor/SELinux labels, sysctls (set pod-wide by SetupSandbox: runc
  refuses net/ipc sysctls once those namespaces are shared with the guest) are removed.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any

from kuasar.common.errors import InvalidArgument
from kuasar.common.pod_files import private_dev_shm, put_dev_shm

GUEST_CGROUP_PARENT = "/kuasar"
# The guest path of the pod's shared PID namespace (a link the agent makes to its holder's ns/pid).
GUEST_POD_PID_NS = "/run/kuasar/pod-pid-ns"
# How CRI names another process's PID namespace (the pod's, or a target container's).
TARGET_PID_NS = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/pid")
# Destinations served by the guest's own, whatever host path CRI named: the pod-wide shm.
GUEST_FILES = {"/dev/shm": "/dev/shm"}
# containerd mounts the pod's hostname/hosts/resolv.conf only when *its* sandbox controller wrote them
# on the host (podsandbox does, a proxy sandboxer's pod has none), so the guest's are added when absent;
# one CRI does mount is kubelet's (its etc-hosts), shared from the host as any volume.
POD_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
# The guest's /dev/shm (the agent mounts it at boot) in place of a container's private one.
GUEST_SHM_MOUNT = {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm",
                   "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec"]}
SHARED_NAMESPACE_TYPES = ("ipc", "uts")
PROPAGATION = {"shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable"}
VOLUMES_DIR = "volumes"


@dataclass(frozen=True)
class ShareBind:
    """A host path to share into the VM; the rewritten spec names it `<guest bundle>/volumes/<name>` until
    the proxy replaces that with the pod's share of it (proxy.HostPrep)."""

    source: str
    name: str
    readonly: bool


def _is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


def rewrite_namespaces(namespaces: list[dict[str, Any]],
                       sandbox_pid: int = 0) -> tuple[list[dict[str, Any]], set[str]]:
    """(the guest's namespace list, the types shared with the guest); `sandbox_pid` is the pod's on the
    host (QEMU's), which CRI names the pod's namespaces by (0: unknown, every pid path is the pod's)."""
    out, shared = [], set()
    for ns in namespaces:
        kind = ns.get("type", "")
        if kind == "network":
            shared.add(kind)
            continue
        if kind in SHARED_NAMESPACE_TYPES and ns.get("path"):
            shared.add(kind)
            continue
        if kind == "pid" and ns.get("path"):
            target = TARGET_PID_NS.fullmatch(ns["path"])
            if target and sandbox_pid and int(target.group(1)) != sandbox_pid:
                out.append({"type": kind, "path": ns["path"]})  # a container's, by its guest pid
            else:
                out.append({"type": kind, "path": GUEST_POD_PID_NS})
            continue
        out.append({"type": kind})  # new, private to the container (a host path means nothing here)
    return out, shared


def rewrite_mounts(mounts: list[dict[str, Any]], guest_bundle: str,
                   readonly_root: bool = False) -> tuple[list[dict[str, Any]], list[ShareBind]]:
    out, binds = [], []
    for mount in mounts:
        mount = copy.deepcopy(mount)
        if not _is_bind(mount):
            out.append(mount)
            continue
        source, dest = mount.get("source", ""), mount.get("destination", "")
        if not os.path.isabs(source):
            raise InvalidArgument(f"bind mount {dest!r}: source {source!r} is not an absolute host path")
        options = [o for o in mount.get("options") or [] if o not in PROPAGATION]
        options.append("rprivate")
        mount["options"] = options
        if dest in GUEST_FILES:
            mount["source"] = GUEST_FILES[dest]
        else:
            name = str(len(binds))
            binds.append(ShareBind(source=source, name=name, readonly="ro" in options))
            mount["source"] = f"{guest_bundle}/{VOLUMES_DIR}/{name}"
        out.append(mount)
    present = {m.get("destination") for m in out}
    for dest in POD_FILES:
        if dest not in present:
            out.append({"destination": dest, "type": "bind", "source": dest,
                        "options": ["rbind", "rprivate", "ro" if readonly_root else "rw"]})
    return out, binds


def rewrite_spec(spec: dict[str, Any], container_id: str, guest_bundle: str,
                 sandbox_pid: int = 0) -> tuple[dict[str, Any], list[ShareBind]]:
    """The guest's spec and the host binds the proxy must make before the agent sees it (pure)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise InvalidArgument("config.json is not an OCI runtime spec with a process")
    guest = copy.deepcopy(spec)
    root = guest.get("root") or {}
    guest["root"] = {"path": "rootfs", "readonly": bool(root.get("readonly", False))}
    guest.pop("hooks", None)
    process = guest["process"]
    for key in ("apparmorProfile", "selinuxLabel"):
        process.pop(key, None)
    linux = guest.setdefault("linux", {})
    namespaces, shared = rewrite_namespaces(linux.get("namespaces") or [], sandbox_pid)
    linux["namespaces"] = namespaces
    if "uts" in shared:
        guest.pop("hostname", None)  # runc refuses a hostname without a private UTS namespace
        guest.pop("domainname", None)
    linux["cgroupsPath"] = f"{GUEST_CGROUP_PARENT}/{container_id}"
    for key in ("devices", "mountLabel", "intelRdt", "sysctl"):
        linux.pop(key, None)
    _drop_host_cpuset(linux.get("resources"))
    guest["mounts"], binds = rewrite_mounts(guest.get("mounts") or [], guest_bundle, guest["root"]["readonly"])
    private_shm = private_dev_shm(guest)
    if private_shm is not None:
        # containerd's default spec gives each container a tmpfs of its own, since only its own pod
        # sandbox makes a shared one; the containers of a VM pod share the guest's, as those of a runc
        # pod share their pod's (their IPC namespace is the guest's too: SysV memory is shared already).
        put_dev_shm(guest, private_shm, dict(GUEST_SHM_MOUNT, options=list(GUEST_SHM_MOUNT["options"])))
    return guest, binds


def _drop_host_cpuset(resources: Any) -> None:
    """cpuset cpus/mems name the host's CPUs and memory nodes, which the guest does not have."""
    cpu = resources.get("cpu") if isinstance(resources, dict) else None
    if isinstance(cpu, dict):
        cpu.pop("cpus", None)
        cpu.pop("mems", None)


def rewrite_resources(resources: Any) -> Any:
    """UpdateContainerResources' OCI LinuxResources for the guest: CRI sends the whole merged set again,
    the host cpuset of a static CPU manager included, which the guest's cgroup would refuse."""
    if not isinstance(resources, dict):
        raise InvalidArgument("resources are not OCI LinuxResources")
    out = copy.deepcopy(resources)
    _drop_host_cpuset(out)
    return out


def rewrite_process(process: dict[str, Any]) -> dict[str, Any]:
    """An exec's OCI Process for the guest (host security labels removed)."""
    if not isinstance(process, dict):
        raise InvalidArgument("exec spec is not an OCI Process")
    out = dict(process)
    for key in ("apparmorProfile", "selinuxLabel"):
        out.pop(key, None)
    return out
