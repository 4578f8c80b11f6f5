"""Asyncio client for containerd's CRI endpoint (runtime.v1), used to drive sandboxers end to end.

Tests talk to containerd the way kubelet does, so what they exercise is containerd's real CRI
plugin -> Sandbox API -> our sandboxer path, not a shortcut into our own code. The client stays
thin on purpose: every call returns the protobuf response, and gRPC failures surface unchanged as
`grpc.aio.AioRpcError` so a test can assert on the exact status code containerd chose.

Usage::

    async with CriClient("/run/containerd/containerd.sock") as cri:
        pod = pod_config("web")
        pod_id = (await cri.run_pod_sandbox(pod, runtime_handler="kuasar-runc")).pod_sandbox_id
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.api.runtime.v1 import api_pb2_grpc as cri_grpc

# Generous: containerd may pull, unpack and start a VM/runc sandbox inside one RunPodSandbox call.
DEFAULT_TIMEOUT_S = 60.0
# Image pulls are bounded by the registry, not by us.
PULL_TIMEOUT_S = 600.0
# Extra RPC deadline on top of an ExecSync's own timeout, so containerd reports the exec timeout
# (with its partial output) before the client-side deadline cancels the call.
EXEC_SYNC_GRACE_S = 10.0
# The only CRI version containerd 2.x serves.
CRI_API_VERSION = "v1"
# containerd's CRI server accepts up to 16 MiB messages; match it so large ExecSync output or
# ListContainers answers are not rejected by the client first.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Where pod logs go unless a test says otherwise: kubelet's /var/log/pods belongs to kubelet, and
# containerd creates the directories on demand.
DEFAULT_LOG_ROOT = "/tmp/kuasar-py/pods"


def _target(address: str) -> str:
    """Accept a bare socket path, as containerd's config spells it, or a gRPC unix:// target."""
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address
    return f"unix://{address}"


class CriClient:
    """One gRPC channel to containerd, with RuntimeService and ImageService stubs on it."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = _target(address)
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._runtime: cri_grpc.RuntimeServiceStub | None = None
        self._image: cri_grpc.ImageServiceStub | None = None

    async def connect(self, *, wait: bool = True) -> None:
        """Open the channel; by default also wait until containerd answers, so a missing socket
        fails here with a clear timeout rather than inside the first test step."""
        if self._channel is not None:
            return
        channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        if wait:
            try:
                await asyncio.wait_for(channel.channel_ready(), self.timeout)
            except BaseException:
                await channel.close()
                raise
        self._channel = channel
        self._runtime = cri_grpc.RuntimeServiceStub(channel)
        self._image = cri_grpc.ImageServiceStub(channel)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._runtime = self._image = None
            await channel.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def runtime(self) -> cri_grpc.RuntimeServiceStub:
        """Raw RuntimeService stub, for RPCs this class does not wrap."""
        if self._runtime is None:
            raise RuntimeError("CriClient is not connected; call connect() or use 'async with'")
        return self._runtime

    @property
    def image(self) -> cri_grpc.ImageServiceStub:
        """Raw ImageService stub, for RPCs this class does not wrap."""
        if self._image is None:
            raise RuntimeError("CriClient is not connected; call connect() or use 'async with'")
        return self._image

    async def _call(self, rpc: Any, request: Any, deadline: float | None = None) -> Any:
        """Every RPC carries a deadline: a wedged sandboxer must fail a test, not hang the run."""
        return await rpc(request, timeout=self.timeout if deadline is None else deadline)

    # --- RuntimeService -------------------------------------------------------------------

    async def version(self) -> cri.VersionResponse:
        return await self._call(self.runtime.Version, cri.VersionRequest(version=CRI_API_VERSION))

    async def status(self, verbose: bool = False) -> cri.StatusResponse:
        """Runtime conditions (RuntimeReady / NetworkReady): tells a test whether containerd's CRI
        plugin is usable at all before it blames a sandboxer."""
        return await self._call(self.runtime.Status, cri.StatusRequest(verbose=verbose))

    async def run_pod_sandbox(
        self, config: cri.PodSandboxConfig, runtime_handler: str = ""
    ) -> cri.RunPodSandboxResponse:
        """`runtime_handler` selects the containerd runtime entry, and through its `sandboxer`
        setting, which of our sandboxers serves the pod; empty means containerd's default."""
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return await self._call(self.runtime.RunPodSandbox, request)

    async def stop_pod_sandbox(self, pod_id: str) -> cri.StopPodSandboxResponse:
        return await self._call(self.runtime.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    async def remove_pod_sandbox(self, pod_id: str) -> cri.RemovePodSandboxResponse:
        request = cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        return await self._call(self.runtime.RemovePodSandbox, request)

    async def pod_sandbox_status(self, pod_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
        """`verbose` adds containerd's `info` JSON (sandboxer name, pid, runtime options): the
        place to check which sandboxer containerd actually used."""
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return await self._call(self.runtime.PodSandboxStatus, request)

    async def list_pod_sandbox(
        self, filter: cri.PodSandboxFilter | None = None
    ) -> cri.ListPodSandboxResponse:
        return await self._call(self.runtime.ListPodSandbox, cri.ListPodSandboxRequest(filter=filter))

    async def create_container(
        self, pod_id: str, config: cri.ContainerConfig, sandbox_config: cri.PodSandboxConfig
    ) -> cri.CreateContainerResponse:
        """If `config` sets no namespace options, the pod's are copied in, as kubelet does. The
        proto zero value means pid=POD (join the pod's pid namespace), which is not what kubelet
        sends for an ordinary pod, so leaving them unset would test an unusual configuration."""
        linux_ctx = config.linux.security_context
        pod_ctx = sandbox_config.linux.security_context
        if not linux_ctx.HasField("namespace_options") and pod_ctx.HasField("namespace_options"):
            config = cri.ContainerConfig.FromString(config.SerializeToString())
            config.linux.security_context.namespace_options.CopyFrom(pod_ctx.namespace_options)
        request = cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
        )
        return await self._call(self.runtime.CreateContainer, request)

    async def start_container(self, container_id: str) -> cri.StartContainerResponse:
        request = cri.StartContainerRequest(container_id=container_id)
        return await self._call(self.runtime.StartContainer, request)

    # `timeout` is CRI's own field name (a grace period), not an asyncio deadline.
    async def stop_container(
        self, container_id: str, timeout: int = 10  # noqa: ASYNC109
    ) -> cri.StopContainerResponse:
        """`timeout` is the SIGTERM grace period in seconds (0 = SIGKILL at once); the RPC deadline
        is stretched past it so containerd, not the client, decides when to escalate."""
        request = cri.StopContainerRequest(container_id=container_id, timeout=timeout)
        return await self._call(self.runtime.StopContainer, request, timeout + self.timeout)

    async def remove_container(self, container_id: str) -> cri.RemoveContainerResponse:
        request = cri.RemoveContainerRequest(container_id=container_id)
        return await self._call(self.runtime.RemoveContainer, request)

    async def list_containers(self, filter: cri.ContainerFilter | None = None) -> cri.ListContainersResponse:
        return await self._call(self.runtime.ListContainers, cri.ListContainersRequest(filter=filter))

    async def container_status(self, container_id: str, verbose: bool = False) -> cri.ContainerStatusResponse:
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return await self._call(self.runtime.ContainerStatus, request)

    async def update_container_resources(
        self, container_id: str, linux: cri.LinuxContainerResources
    ) -> cri.UpdateContainerResourcesResponse:
        request = cri.UpdateContainerResourcesRequest(container_id=container_id, linux=linux)
        return await self._call(self.runtime.UpdateContainerResources, request)

    # `timeout` (seconds, 0: containerd's default) is CRI's own field, not an asyncio deadline.
    async def checkpoint_container(
        self, container_id: str, location: str, timeout: int = 0  # noqa: ASYNC109
    ) -> cri.CheckpointContainerResponse:
        request = cri.CheckpointContainerRequest(container_id=container_id, location=location, timeout=timeout)
        return await self._call(self.runtime.CheckpointContainer, request)

    # `timeout` is CRI's own field name (enforced by containerd), not an asyncio deadline.
    async def exec_sync(
        self, container_id: str, cmd: Sequence[str], timeout: int = 0  # noqa: ASYNC109
    ) -> cri.ExecSyncResponse:
        """`timeout` is containerd's exec timeout in seconds (0 = none); with 0 the RPC still
        carries the client's default deadline so a hung exec cannot hang the test run."""
        request = cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        deadline = self.timeout if timeout <= 0 else max(self.timeout, timeout + EXEC_SYNC_GRACE_S)
        return await self._call(self.runtime.ExecSync, request, deadline)

    async def exec(
        self,
        container_id: str,
        cmd: Sequence[str],
        tty: bool = False,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool | None = None,
    ) -> str:
        """Return the streaming-server URL to attach to. `stderr` defaults to `not tty` because
        containerd rejects tty together with a separate stderr stream (a tty merges them)."""
        request = cri.ExecRequest(
            container_id=container_id,
            cmd=list(cmd),
            tty=tty,
            stdin=stdin,
            stdout=stdout,
            stderr=(not tty) if stderr is None else stderr,
        )
        response: cri.ExecResponse = await self._call(self.runtime.Exec, request)
        return response.url

    async def attach(self, container_id: str, tty: bool = False, stdin: bool = False, stdout: bool = True,
                     stderr: bool | None = None) -> str:
        """Return the streaming-server URL that attaches to the container's own stdio (`kubectl attach`,
        `kubectl run -it`); `stderr` defaults to `not tty`, as for exec."""
        request = cri.AttachRequest(container_id=container_id, tty=tty, stdin=stdin, stdout=stdout,
                                    stderr=(not tty) if stderr is None else stderr)
        response: cri.AttachResponse = await self._call(self.runtime.Attach, request)
        return response.url

    async def port_forward(self, pod_id: str, ports: Sequence[int]) -> str:
        """Return the streaming-server URL that forwards to `ports` in the pod's network namespace."""
        request = cri.PortForwardRequest(pod_sandbox_id=pod_id, port=list(ports))
        response: cri.PortForwardResponse = await self._call(self.runtime.PortForward, request)
        return response.url

    async def container_stats(self, container_id: str) -> cri.ContainerStatsResponse:
        """Built by containerd from our task Stats answer (cgroups Metrics in an Any), so this is
        the end-to-end check of those protos."""
        request = cri.ContainerStatsRequest(container_id=container_id)
        return await self._call(self.runtime.ContainerStats, request)

    async def list_container_stats(
        self, filter: cri.ContainerStatsFilter | None = None
    ) -> cri.ListContainerStatsResponse:
        request = cri.ListContainerStatsRequest(filter=filter)
        return await self._call(self.runtime.ListContainerStats, request)

    async def pod_sandbox_stats(self, pod_id: str) -> cri.PodSandboxStatsResponse:
        request = cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id)
        return await self._call(self.runtime.PodSandboxStats, request)

    # --- ImageService ---------------------------------------------------------------------

    async def list_images(self, image: str | None = None) -> cri.ListImagesResponse:
        image_filter = cri.ImageFilter(image=cri.ImageSpec(image=image)) if image else None
        request = cri.ListImagesRequest(filter=image_filter)
        return await self._call(self.image.ListImages, request)

    async def image_status(self, image: str, verbose: bool = False) -> cri.ImageStatusResponse:
        """An unknown image is not an error: the response simply has no `image` field set."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=verbose)
        return await self._call(self.image.ImageStatus, request)

    async def pull_image(
        self, image: str, sandbox_config: cri.PodSandboxConfig | None = None, deadline: float = PULL_TIMEOUT_S
    ) -> cri.PullImageResponse:
        """`sandbox_config` matters only to runtimes that pull per sandbox (e.g. into a guest);
        containerd's default pulls on the host and ignores it."""
        request = cri.PullImageRequest(image=cri.ImageSpec(image=image), sandbox_config=sandbox_config)
        return await self._call(self.image.PullImage, request, deadline)

    async def remove_image(self, image: str) -> cri.RemoveImageResponse:
        request = cri.RemoveImageRequest(image=cri.ImageSpec(image=image))
        return await self._call(self.image.RemoveImage, request)


# --- builders --------------------------------------------------------------------------------

# How many ids kubelet maps into each user-namespaced pod.
USERNS_IDS_PER_POD = 65536


def pod_config(
    name: str,
    namespace: str = "default",
    uid: str | None = None,
    attempt: int = 0,
    host_network: bool = True,
    log_directory: str | None = None,
    hostname: str | None = None,
    cgroup_parent: str = "",
    share_pid: bool = False,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    sysctls: Mapping[str, str] | None = None,
    userns_host_id: int | None = None,
) -> cri.PodSandboxConfig:
    """A PodSandboxConfig shaped like kubelet's for a plain pod.

    With `userns_host_id`, the pod has its own user namespace as kubelet asks for `hostUsers: false`:
    ids 0..65535 inside are userns_host_id.. outside (kubelet's 65536 ids per pod).

    host_network defaults to True because test hosts usually have no CNI configured; with
    host_network=False containerd needs a working CNI plugin to set up the pod network.
    Namespace modes are always set explicitly: the proto zero value (POD) is not kubelet's
    pid default (CONTAINER).
    """
    uid = uid or uuid.uuid4().hex
    if log_directory is None:
        log_directory = f"{DEFAULT_LOG_ROOT}/{namespace}_{name}_{uid}"
    if hostname is None:
        # kubelet leaves it empty for host-network pods, so the node's hostname shows through.
        hostname = "" if host_network else name
    namespace_options = cri.NamespaceOption(
        network=cri.NODE if host_network else cri.POD,
        pid=cri.POD if share_pid else cri.CONTAINER,
        ipc=cri.POD,
    )
    if userns_host_id is not None:
        ids = cri.IDMapping(host_id=userns_host_id, container_id=0, length=USERNS_IDS_PER_POD)
        namespace_options.userns_options.CopyFrom(cri.UserNamespace(mode=cri.POD, uids=[ids], gids=[ids]))
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
        hostname=hostname,
        log_directory=log_directory,
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=namespace_options),
            sysctls=dict(sysctls or {}),
        ),
    )


def container_config(
    name: str,
    image: str,
    command: Sequence[str],
    args: Sequence[str] = (),
    log_path: str | None = None,
    tty: bool = False,
    stdin: bool = False,
    stdin_once: bool = False,
    env: Mapping[str, str] | None = None,
    working_dir: str | None = None,
    memory_limit: int | None = None,
    labels: Mapping[str, str] | None = None,
) -> cri.ContainerConfig:
    """A ContainerConfig for `image` running `command + args`.

    `log_path` is relative to the pod's log_directory (CRI's rule); it defaults to
    `<name>.log`. `memory_limit` is in bytes and lands in linux.resources, which is what a
    sandboxer sees as the OCI memory limit and what container_stats later reports against.
    Namespace options are left unset so CriClient.create_container copies the pod's, as kubelet
    does.
    """
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0),
        image=cri.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        working_dir=working_dir or "",
        envs=[cri.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        labels=dict(labels or {}),
        log_path=f"{name}.log" if log_path is None else log_path,
        stdin=stdin,
        stdin_once=stdin_once,
        tty=tty,
    )
    if memory_limit is not None:
        config.linux.resources.memory_limit_in_bytes = memory_limit
    return config
