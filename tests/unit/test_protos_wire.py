"""Wire-level checks of the hand-written protos against the numbers containerd and kubelet use.

Field names and Python round-trips cannot catch a wrong field number: both ends of such a test
would share the mistake. So these tests compare serialized bytes with literals worked out from
the upstream definitions (tag byte = field_number << 3 | wire_type), for the fields our
sandboxers and tests depend on.
"""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from kuasar.common.api.containerd.cgroups.v1 import metrics_pb2 as cg1
from kuasar.common.api.containerd.cgroups.v2 import metrics_pb2 as cg2
from kuasar.common.api.containerd.events import task_pb2 as events
from kuasar.common.api.containerd.runc.options import oci_pb2
from kuasar.common.api.containerd.runtime.task.v2 import shim_pb2 as task_v2
from kuasar.common.api.containerd.runtime.task.v3 import shim_pb2 as task_v3
from kuasar.common.api.containerd.services.events.ttrpc.v1 import events_pb2 as ttrpc_events
from kuasar.common.api.containerd.services.sandbox.v1 import sandbox_pb2
from kuasar.common.api.containerd.services.streaming.v1 import streaming_pb2
from kuasar.common.api.containerd.types import event_pb2, mount_pb2, platform_pb2
from kuasar.common.api.containerd.types import sandbox_pb2 as sandbox_types
from kuasar.common.api.containerd.types.task import task_pb2 as task_types
from kuasar.common.api.containerd.types.transfer import streaming_pb2 as transfer
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import container_config, pod_config


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


# --- Sandbox API -----------------------------------------------------------------------------


def test_controller_start_response_bytes() -> None:
    msg = sandbox_pb2.ControllerStartResponse(
        sandbox_id="sb", pid=7, address="ttrpc+unix:///a", version=3
    )
    assert msg.SerializeToString() == (
        b"\x0a\x02sb"  # 1 sandbox_id
        b"\x10\x07"  # 2 pid
        b"\x2a\x0fttrpc+unix:///a"  # 5 address
        b"\x30\x03"  # 6 version
    )


def test_controller_start_response_spec_is_field_7() -> None:
    msg = sandbox_pb2.ControllerStartResponse(spec=any_pb2.Any(type_url="t", value=b"v"))
    assert msg.SerializeToString() == b"\x3a\x06\x0a\x01t\x12\x01v"


@pytest.mark.parametrize(
    "cls",
    [
        sandbox_pb2.ControllerCreateRequest,
        sandbox_pb2.ControllerStartRequest,
        sandbox_pb2.ControllerPlatformRequest,
        sandbox_pb2.ControllerStopRequest,
        sandbox_pb2.ControllerWaitRequest,
        sandbox_pb2.ControllerStatusRequest,
        sandbox_pb2.ControllerShutdownRequest,
        sandbox_pb2.ControllerMetricsRequest,
    ],
)
def test_sandboxer_is_field_10(cls: type) -> None:
    assert cls(sandboxer="k").SerializeToString() == b"\x52\x01k"


def test_controller_update_request_sandboxer_is_field_2() -> None:
    msg = sandbox_pb2.ControllerUpdateRequest(sandbox_id="s", sandboxer="k", fields=["labels"])
    assert msg.SerializeToString() == b"\x0a\x01s\x12\x01k\x22\x06labels"


def test_controller_create_request_fields() -> None:
    msg = sandbox_pb2.ControllerCreateRequest(
        sandbox_id="s",
        rootfs=[mount_pb2.Mount(type="bind", source="/a", target="/b", options=["ro"])],
        netns_path="/n",
        sandbox=sandbox_types.Sandbox(sandbox_id="s", sandboxer="k"),
    )
    mount = b"\x0a\x04bind\x12\x02/a\x1a\x02/b\x22\x02ro"
    sandbox = b"\x0a\x01s\x52\x01k"  # Sandbox.sandboxer is field 10 too
    assert msg.SerializeToString() == (
        b"\x0a\x01s" + b"\x12" + bytes([len(mount)]) + mount + b"\x22\x02/n" + b"\x32\x06" + sandbox
    )


def test_controller_status_and_wait_responses() -> None:
    status = sandbox_pb2.ControllerStatusResponse(state="SANDBOX_READY", address="a", version=2)
    assert status.SerializeToString() == b"\x1a\x0dSANDBOX_READY\x42\x01a\x48\x02"
    wait = sandbox_pb2.ControllerWaitResponse(exit_status=137, exited_at=_ts(1))
    assert wait.SerializeToString() == b"\x08\x89\x01\x12\x02\x08\x01"


def test_controller_stop_and_platform() -> None:
    assert sandbox_pb2.ControllerStopRequest(timeout_secs=5).SerializeToString() == b"\x10\x05"
    platform = platform_pb2.Platform(os="linux", architecture="amd64", variant="v2", os_version="x")
    resp = sandbox_pb2.ControllerPlatformResponse(platform=platform)
    inner = b"\x0a\x05linux\x12\x05amd64\x1a\x02v2\x22\x01x"
    assert resp.SerializeToString() == b"\x0a" + bytes([len(inner)]) + inner


def test_controller_service_methods() -> None:
    service = sandbox_pb2.DESCRIPTOR.services_by_name["Controller"]
    assert service.full_name == "containerd.services.sandbox.v1.Controller"
    assert [m.name for m in service.methods] == [
        "Create", "Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics", "Update",
    ]
    for method in service.methods:
        assert method.input_type.name == f"Controller{method.name}Request"
        assert method.output_type.name == f"Controller{method.name}Response"


# --- task API --------------------------------------------------------------------------------


def test_runc_options_task_api_fields() -> None:
    msg = oci_pb2.Options(task_api_address="ttrpc+unix:///t", task_api_version=3)
    assert msg.SerializeToString() == b"\x62\x0fttrpc+unix:///t\x68\x03"
    assert oci_pb2.Options(systemd_cgroup=True, binary_name="runc").SerializeToString() == (
        b"\x32\x04runc\x48\x01"
    )
    assert oci_pb2.Options.DESCRIPTOR.full_name == "containerd.runc.v1.Options"


def test_create_task_request_fields() -> None:
    msg = task_v2.CreateTaskRequest(
        id="c",
        bundle="/b",
        rootfs=[mount_pb2.Mount(type="overlay")],
        terminal=True,
        stdin="i",
        stdout="o",
        stderr="e",
        checkpoint="k",
        parent_checkpoint="p",
        options=any_pb2.Any(type_url="u"),
    )
    assert msg.SerializeToString() == (
        b"\x0a\x01c"  # 1 id
        b"\x12\x02/b"  # 2 bundle
        b"\x1a\x09\x0a\x07overlay"  # 3 rootfs
        b"\x20\x01"  # 4 terminal
        b"\x2a\x01i\x32\x01o\x3a\x01e"  # 5-7 stdio
        b"\x42\x01k\x4a\x01p"  # 8 checkpoint, 9 parent_checkpoint
        b"\x52\x03\x0a\x01u"  # 10 options
    )


def test_state_response_fields() -> None:
    msg = task_v2.StateResponse(
        id="c", pid=42, status=task_types.STOPPED, exit_status=1, exited_at=_ts(1), exec_id="x"
    )
    assert msg.SerializeToString() == (
        b"\x0a\x01c\x18\x2a\x20\x03\x48\x01"  # 1 id, 3 pid, 4 status, 9 exit_status
        b"\x52\x02\x08\x01"  # 10 exited_at
        b"\x5a\x01x"  # 11 exec_id
    )


def test_task_status_enum_values() -> None:
    assert [(v.name, v.number) for v in task_types.Status.DESCRIPTOR.values] == [
        ("UNKNOWN", 0), ("CREATED", 1), ("RUNNING", 2), ("STOPPED", 3), ("PAUSED", 4), ("PAUSING", 5),
    ]
    assert task_types.Status.DESCRIPTOR.full_name == "containerd.v1.types.Status"


def test_task_misc_messages() -> None:
    assert task_v2.ExecProcessRequest(exec_id="e", spec=any_pb2.Any()).SerializeToString() == (
        b"\x12\x01e\x3a\x00"
    )
    assert task_v2.KillRequest(signal=9, all=True).SerializeToString() == b"\x18\x09\x20\x01"
    assert task_v2.ResizePtyRequest(width=80, height=24).SerializeToString() == b"\x18\x50\x20\x18"
    assert task_v2.CloseIORequest(stdin=True).SerializeToString() == b"\x18\x01"
    assert task_v2.ConnectResponse(shim_pid=1, task_pid=2, version="3").SerializeToString() == (
        b"\x08\x01\x10\x02\x1a\x013"
    )
    assert task_v2.DeleteResponse(pid=1, exit_status=2, exited_at=_ts(3)).SerializeToString() == (
        b"\x08\x01\x10\x02\x1a\x02\x08\x03"
    )
    assert task_v2.ShutdownRequest(now=True).SerializeToString() == b"\x10\x01"
    update = task_v2.UpdateTaskRequest(annotations={"a": "b"})
    assert update.SerializeToString() == b"\x1a\x06\x0a\x01a\x12\x01b"
    pids = task_v2.PidsResponse(processes=[task_types.ProcessInfo(pid=5)])
    assert pids.SerializeToString() == b"\x0a\x02\x08\x05"


_TASK_METHODS = [
    "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill", "Exec",
    "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
]


def test_task_services_v2_and_v3() -> None:
    v2 = task_v2.DESCRIPTOR.services_by_name["Task"]
    v3 = task_v3.DESCRIPTOR.services_by_name["Task"]
    assert v2.full_name == "containerd.task.v2.Task"
    assert v3.full_name == "containerd.task.v3.Task"
    assert [m.name for m in v2.methods] == _TASK_METHODS
    assert [m.name for m in v3.methods] == _TASK_METHODS
    for a, b in zip(v2.methods, v3.methods, strict=True):
        assert a.input_type is b.input_type
        assert a.output_type is b.output_type
    assert v2.methods_by_name["Exec"].output_type.full_name == "google.protobuf.Empty"
    assert v2.methods_by_name["Create"].input_type.name == "CreateTaskRequest"


# --- events and streaming --------------------------------------------------------------------


def test_task_exit_fields() -> None:
    msg = events.TaskExit(container_id="c", id="e", pid=3, exit_status=137, exited_at=_ts(1))
    assert msg.SerializeToString() == b"\x0a\x01c\x12\x01e\x18\x03\x20\x89\x01\x2a\x02\x08\x01"
    assert events.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"


def test_task_event_fields() -> None:
    create = events.TaskCreate(container_id="c", io=events.TaskIO(terminal=True), pid=9)
    assert create.SerializeToString() == b"\x0a\x01c\x22\x02\x20\x01\x30\x09"
    delete = events.TaskDelete(container_id="c", exit_status=1, id="e")
    assert delete.SerializeToString() == b"\x0a\x01c\x18\x01\x2a\x01e"
    started = events.TaskExecStarted(container_id="c", exec_id="e", pid=4)
    assert started.SerializeToString() == b"\x0a\x01c\x12\x01e\x18\x04"


def test_forward_request_envelope() -> None:
    envelope = event_pb2.Envelope(
        timestamp=_ts(1), namespace="k8s.io", topic="/tasks/exit", event=any_pb2.Any(type_url="u")
    )
    inner = b"\x0a\x02\x08\x01\x12\x06k8s.io\x1a\x0b/tasks/exit\x22\x03\x0a\x01u"
    assert envelope.SerializeToString() == inner
    forward = ttrpc_events.ForwardRequest(envelope=envelope)
    assert forward.SerializeToString() == b"\x0a" + bytes([len(inner)]) + inner
    assert event_pb2.Envelope.DESCRIPTOR.full_name == "containerd.types.Envelope"
    service = ttrpc_events.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in service.methods] == ["Forward"]


def test_streaming() -> None:
    service = streaming_pb2.DESCRIPTOR.services_by_name["Streaming"]
    assert service.full_name == "containerd.services.streaming.v1.Streaming"
    stream = service.methods_by_name["Stream"]
    assert stream.client_streaming and stream.server_streaming
    assert streaming_pb2.StreamInit(id="x").SerializeToString() == b"\x0a\x01x"
    assert transfer.Data(data=b"d").SerializeToString() == b"\x0a\x01d"
    assert transfer.WindowUpdate(update=-1).SerializeToString() == b"\x08" + b"\xff" * 9 + b"\x01"
    assert transfer.WindowUpdate.DESCRIPTOR.full_name == "containerd.types.transfer.WindowUpdate"


# --- cgroup metrics (containerd turns these into CRI ContainerStats) -------------------------


def test_cgroups_v1_memory_usage_path() -> None:
    # Metrics.memory (4) -> MemoryStat.usage (33, a two-byte tag) -> MemoryEntry.usage (2)
    msg = cg1.Metrics(memory=cg1.MemoryStat(usage=cg1.MemoryEntry(usage=1000)))
    assert msg.SerializeToString() == b"\x22\x06\x8a\x02\x03\x10\xe8\x07"
    assert cg1.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"


def test_cgroups_v1_cpu_and_inactive_file() -> None:
    cpu = cg1.Metrics(cpu=cg1.CPUStat(usage=cg1.CPUUsage(total=5, user=3)))
    assert cpu.SerializeToString() == b"\x1a\x06\x0a\x04\x08\x05\x18\x03"
    mem = cg1.Metrics(memory=cg1.MemoryStat(total_inactive_file=1, rss=2, pg_fault=4))
    # rss 2, pg_fault 9, total_inactive_file 30 (tag 0xf0 0x01)
    assert mem.SerializeToString() == b"\x22\x07\x10\x02\x48\x04\xf0\x01\x01"
    pids = cg1.Metrics(pids=cg1.PidsStat(current=1, limit=2))
    assert pids.SerializeToString() == b"\x12\x04\x08\x01\x10\x02"


def test_cgroups_v2_memory_and_cpu() -> None:
    msg = cg2.Metrics(
        cpu=cg2.CPUStat(usage_usec=1, user_usec=2, system_usec=3),
        memory=cg2.MemoryStat(inactive_file=5, usage=1000, usage_limit=7),
    )
    assert msg.SerializeToString() == (
        b"\x12\x06\x08\x01\x10\x02\x18\x03"  # 2 cpu
        b"\x22\x09\x68\x05\x80\x02\xe8\x07\x88\x02\x07"  # 4 memory: 13, 32, 33
    )
    assert cg2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"
    events_msg = cg2.Metrics(memory_events=cg2.MemoryEvents(oom_kill=1))
    assert events_msg.SerializeToString() == b"\x42\x02\x28\x01"


def test_metrics_in_any_carry_full_name() -> None:
    packed = any_pb2.Any()
    packed.Pack(cg2.Metrics())
    # containerd's typeurl resolves by message full name after the last '/'.
    assert packed.type_url.rsplit("/", 1)[-1] == "io.containerd.cgroups.v2.Metrics"


# --- CRI -------------------------------------------------------------------------------------


def test_pod_sandbox_config_cgroup_parent() -> None:
    msg = cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(cgroup_parent="/k"))
    assert msg.SerializeToString() == b"\x42\x04\x0a\x02/k"


def test_pod_sandbox_config_namespace_options() -> None:
    options = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD, target_id="t")
    assert options.SerializeToString() == b"\x08\x02\x10\x01\x22\x01t"
    msg = cri.PodSandboxConfig(
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(pid=cri.CONTAINER)
            )
        )
    )
    assert msg.SerializeToString() == b"\x42\x06\x12\x04\x0a\x02\x10\x01"
    assert [(v.name, v.number) for v in cri.NamespaceMode.DESCRIPTOR.values] == [
        ("POD", 0), ("CONTAINER", 1), ("NODE", 2), ("TARGET", 3),
    ]


def test_pod_sandbox_config_other_fields() -> None:
    msg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="n", uid="u", namespace="d", attempt=1),
        hostname="h",
        log_directory="/l",
        labels={"a": "b"},
    )
    assert msg.SerializeToString() == (
        b"\x0a\x0b\x0a\x01n\x12\x01u\x1a\x01d\x20\x01"  # 1 metadata
        b"\x12\x01h\x1a\x02/l"  # 2 hostname, 3 log_directory
        b"\x32\x06\x0a\x01a\x12\x01b"  # 6 labels
    )
    request = cri.RunPodSandboxRequest(config=cri.PodSandboxConfig(hostname="h"), runtime_handler="r")
    assert request.SerializeToString() == b"\x0a\x03\x12\x01h\x12\x01r"


def test_container_config_fields() -> None:
    msg = cri.ContainerConfig(
        image=cri.ImageSpec(image="i"),
        command=["c"],
        log_path="l",
        tty=True,
        linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(memory_limit_in_bytes=1)),
    )
    assert msg.SerializeToString() == (
        b"\x12\x03\x0a\x01i\x1a\x01c"  # 2 image, 3 command
        b"\x5a\x01l\x70\x01"  # 11 log_path, 14 tty
        b"\x7a\x04\x0a\x02\x20\x01"  # 15 linux -> 1 resources -> 4 memory_limit_in_bytes
    )


def test_cri_states_and_exec() -> None:
    assert cri.SANDBOX_READY == 0 and cri.SANDBOX_NOTREADY == 1
    assert (cri.CONTAINER_CREATED, cri.CONTAINER_RUNNING, cri.CONTAINER_EXITED) == (0, 1, 2)
    assert cri.ExecSyncRequest(container_id="c", cmd=["a"], timeout=5).SerializeToString() == (
        b"\x0a\x01c\x12\x01a\x18\x05"
    )
    assert cri.ExecResponse(url="u").SerializeToString() == b"\x0a\x01u"


def test_cri_service_names() -> None:
    runtime = cri.DESCRIPTOR.services_by_name["RuntimeService"]
    image = cri.DESCRIPTOR.services_by_name["ImageService"]
    assert runtime.full_name == "runtime.v1.RuntimeService"
    assert image.full_name == "runtime.v1.ImageService"
    assert {"RunPodSandbox", "CreateContainer", "ExecSync", "ContainerStats", "Status"} <= set(
        runtime.methods_by_name
    )
    assert set(image.methods_by_name) == {"ListImages", "ImageStatus", "PullImage", "RemoveImage"}


def test_builders_produce_kubelet_shaped_configs() -> None:
    pod = pod_config("web", uid="u1", cgroup_parent="/kubepods", labels={"app": "web"})
    ns = pod.linux.security_context.namespace_options
    assert (ns.network, ns.pid, ns.ipc) == (cri.NODE, cri.CONTAINER, cri.POD)
    assert pod.metadata.name == "web" and pod.metadata.uid == "u1"
    assert pod.log_directory.endswith("/default_web_u1")
    assert pod.linux.cgroup_parent == "/kubepods"
    shared = pod_config("x", share_pid=True, host_network=False)
    assert shared.linux.security_context.namespace_options.pid == cri.POD
    assert shared.linux.security_context.namespace_options.network == cri.POD
    assert shared.hostname == "x"
    ctr = container_config("app", "busybox", ["sleep"], args=["1"], env={"A": "1"}, memory_limit=1 << 20)
    assert list(ctr.command) == ["sleep"] and list(ctr.args) == ["1"]
    assert ctr.log_path == "app.log"
    assert ctr.linux.resources.memory_limit_in_bytes == 1 << 20
    assert [(e.key, e.value) for e in ctr.envs] == [("A", "1")]
    assert not ctr.linux.security_context.HasField("namespace_options")
