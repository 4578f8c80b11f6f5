"""`kuasar-ctl`: crictl's habits over containerd's CRI socket, plus a direct look into our sandboxers.

    kuasar-ctl runp --runtime kuasar-runc --name web            # or: kuasar-ctl runp pod.json
    kuasar-ctl create <pod> --image busybox --name c1 -- echo hi  # or: create <pod> ctr.json pod.json
    kuasar-ctl start <container>; kuasar-ctl logs -f <container>; kuasar-ctl exec <container> -- ls /
    kuasar-ctl ps -a; kuasar-ctl pods; kuasar-ctl stop|rm <container>; kuasar-ctl stopp|rmp <pod>
    kuasar-ctl inspect <container>; kuasar-ctl inspectp <pod>; kuasar-ctl images
    kuasar-ctl sandboxes ls; kuasar-ctl sandbox status <id>       # straight to the sandboxers

Ids may be abbreviated to any unique prefix. Tables are for people; `--json` (before or after the
command) prints JSON for scripts. Slow steps show a spinner on a terminal (stderr only).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from kuasar.common import __version__
from kuasar.common.api.runtime.v1 import api_pb2 as cri
from kuasar.common.cri_client import EXEC_SYNC_GRACE_S, CriClient

from . import configs, logs, output, progress, sandboxers

T = TypeVar("T")

DEFAULT_ENDPOINT = "/run/containerd/containerd.sock"
DEFAULT_RUNTIME = "kuasar-runc"
CONTAINER_STATES = {"created": cri.CONTAINER_CREATED, "running": cri.CONTAINER_RUNNING,
                    "exited": cri.CONTAINER_EXITED, "unknown": cri.CONTAINER_UNKNOWN}
POD_STATES = {"ready": cri.SANDBOX_READY, "notready": cri.SANDBOX_NOTREADY}
CONTEXT = {"help_option_names": ["-h", "--help"]}
# Integer options go into protobuf fields, which raise a ValueError (a traceback) for what does not fit:
# click checks the range instead. ATTEMPT is a uint32; SECONDS are int64 fields, but containerd turns
# them into a Go time.Duration and we into a gRPC deadline, both int64 nanoseconds: 2**31 s is ~68 years.
ATTEMPT = click.IntRange(0, 2**32 - 1)
SECONDS = click.IntRange(0, 2**31 - 1)
# The same bound for --timeout: a larger one overflowed the gRPC deadline, and every call failed at once
# with a misleading DEADLINE_EXCEEDED.
MAX_TIMEOUT_S = float(2**31 - 1)
# `ctx.meta` key: how many of a command's words came after `--` (see CommandWithDashes).
AFTER_DASHES = "kuasar.ctl.after_dashes"


@dataclass
class Settings:
    endpoint: str
    timeout: float
    json: bool
    progress: bool

    def use_json(self, local: bool) -> bool:
        return self.json or local


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


# How long the socket probe waits for containerd to accept (it answers in microseconds when it works).
ENDPOINT_PROBE_TIMEOUT = 2.0


def run_cri(settings: Settings, body: Callable[[CriClient], Awaitable[T]]) -> T:
    """Run `body` with a connected CRI client; gRPC failures become one clear line and exit 1."""

    async def run() -> T:
        client = CriClient(settings.endpoint, timeout=settings.timeout)
        try:
            await client.connect()
        except (TimeoutError, grpc.aio.AioRpcError):
            raise click.ClickException(f"containerd does not answer on {settings.endpoint} "
                                       "(wrong --runtime-endpoint / CONTAINER_RUNTIME_ENDPOINT?)") from None
        try:
            return await body(client)
        finally:
            await client.close()

    check_endpoint(settings.endpoint, settings.timeout)
    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise click.ClickException(f"{exc.details()} ({exc.code().name})") from None
    except configs.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def check_endpoint(path: str, timeout: float) -> None:
    """A missing socket, one we may not open or one nobody listens on fails at once, with its reason,
    instead of after --timeout seconds of waiting for a gRPC channel."""
    if "://" in path:
        return  # not a unix socket path: gRPC says what is wrong with it
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A full listen backlog (a containerd that stopped accepting) blocks connect() for ever.
    probe.settimeout(min(timeout, ENDPOINT_PROBE_TIMEOUT))
    try:
        probe.connect(path)
    except (TimeoutError, BlockingIOError):  # (a full backlog answers a timed connect with EAGAIN)
        raise click.ClickException(f"containerd does not accept connections on {path}") from None
    except FileNotFoundError:
        raise click.ClickException(f"no socket at {path}: is containerd running? "
                                   "(wrong --runtime-endpoint / CONTAINER_RUNTIME_ENDPOINT?)") from None
    except PermissionError:
        raise click.ClickException(f"{path}: permission denied (containerd's socket is root's)") from None
    except ConnectionRefusedError:
        raise click.ClickException(f"nothing listens on {path}: containerd is not running") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None
    finally:
        probe.close()


async def resolve_container(client: CriClient, prefix: str) -> cri.Container:
    items = (await client.list_containers()).containers
    return _unique(prefix, items, "container", lambda c: c.id)


async def resolve_pod(client: CriClient, prefix: str) -> cri.PodSandbox:
    items = (await client.list_pod_sandbox()).items
    return _unique(prefix, items, "pod", lambda p: p.id)


def _unique(prefix: str, items: Sequence[T], what: str, key: Callable[[T], str]) -> T:
    exact = [i for i in items if key(i) == prefix]
    if exact:
        return exact[0]
    found = [i for i in items if key(i).startswith(prefix)] if prefix else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise click.ClickException(f"no {what} with id {prefix!r}")
    raise click.ClickException(f"{prefix!r} matches {len(found)} {what}s; give more of the id")


def _finite(value: float, name: str) -> float:
    if math.isnan(value):  # passes FloatRange's comparisons
        raise click.BadParameter("must be a number of seconds", param_hint=name)
    return value


@click.group(context_settings=CONTEXT)
@click.option("-r", "--runtime-endpoint", "endpoint", envvar="CONTAINER_RUNTIME_ENDPOINT", default=DEFAULT_ENDPOINT,
              show_default=True, help="containerd's CRI socket (env CONTAINER_RUNTIME_ENDPOINT).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=MAX_TIMEOUT_S), default=60.0,
              show_default=True, callback=lambda ctx, param, value: _finite(value, "--timeout"),
              help="Seconds per CRI call.")
@click.option("--json", "as_json", is_flag=True, help="JSON output for every command (for scripts).")
@click.option("--no-progress", is_flag=True, help="Never show a spinner for slow steps.")
@click.version_option(__version__, prog_name="kuasar-ctl")
@click.pass_context
def main(ctx: click.Context, endpoint: str, timeout: float, as_json: bool, no_progress: bool) -> None:
    """A command line for kuasar-py: pods and containers through containerd's CRI, sandboxers directly."""
    ctx.obj = Settings(endpoint.removeprefix("unix://"), timeout, as_json, not no_progress)


# -- pods ------------------------------------------------------------------------------------------
@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--runtime", envvar="KUASAR_RUNTIME", default=DEFAULT_RUNTIME, show_default=True,
              help="containerd runtime handler (kuasar-runc, kuasar-wasm, kuasar-vmm, kuasar-quark, kuasar-gvisor).")
@click.option("--name", help="Pod name (metadata.name).")
@click.option("--namespace", help="Pod namespace [default: default].")
@click.option("--uid", help="Pod uid [default: random].")
@click.option("--attempt", type=ATTEMPT)
@click.option("--hostname")
@click.option("--host-network/--pod-network", default=None,
              help="Share the host's network, or get one from CNI [default: host network].")
@click.option("--share-pid/--no-share-pid", default=None, help="One PID namespace for the whole pod.")
@click.option("--log-dir", help="Pod log directory [default: /var/log/pods/<ns>_<name>_<uid>].")
@click.option("--cgroup-parent")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
@click.option("--annotation", "annotations", multiple=True, metavar="KEY=VALUE")
@json_option
@click.pass_obj
def runp(settings: Settings, config_file: str | None, runtime: str, name: str | None, namespace: str | None,
         uid: str | None, attempt: int | None, hostname: str | None, host_network: bool | None,
         share_pid: bool | None, log_dir: str | None, cgroup_parent: str | None, labels: tuple[str, ...],
         annotations: tuple[str, ...], as_json: bool) -> None:
    """Run a pod sandbox (from a crictl pod JSON file and/or flags); prints its id."""
    try:
        config = configs.pod_config(config_file, name=name, namespace=namespace, uid=uid, attempt=attempt,
                                    hostname=hostname, host_network=host_network, log_directory=log_dir,
                                    cgroup_parent=cgroup_parent, share_pid=share_pid,
                                    labels=configs.parse_pairs(labels, "--label"),
                                    annotations=configs.parse_pairs(annotations, "--annotation"))
    except configs.ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    async def body(client: CriClient) -> str:
        async with progress.step(f"RunPodSandbox {config.metadata.name} (runtime {runtime or 'default'})",
                                 settings.progress):
            return (await client.run_pod_sandbox(config, runtime_handler=runtime)).pod_sandbox_id

    pod_id = run_cri(settings, body)
    configs.remember_pod(pod_id, config)
    if settings.use_json(as_json):
        output.print_json({"id": pod_id, "name": config.metadata.name, "namespace": config.metadata.namespace,
                           "runtime": runtime, "log_directory": config.log_directory})
    else:
        click.echo(pod_id)


@main.command()
@click.argument("pods", nargs=-1, required=True)
@json_option
@click.pass_obj
def stopp(settings: Settings, pods: tuple[str, ...], as_json: bool) -> None:
    """Stop pod sandboxes (their containers are killed)."""

    async def body(client: CriClient) -> list[str]:
        done = []
        for prefix in pods:
            pod = await resolve_pod(client, prefix)
            async with progress.step(f"StopPodSandbox {output.short_id(pod.id)}", settings.progress):
                await client.stop_pod_sandbox(pod.id)
            done.append(pod.id)
        return done

    _report(settings, as_json, "Stopped sandbox", run_cri(settings, body))


@main.command()
@click.argument("pods", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Stop ready pods first.")
@json_option
@click.pass_obj
def rmp(settings: Settings, pods: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Remove pod sandboxes (and their containers)."""

    async def body(client: CriClient) -> list[str]:
        done = []
        for prefix in pods:
            pod = await resolve_pod(client, prefix)
            if pod.state == cri.SANDBOX_READY and not force:
                raise click.ClickException(f"pod {output.short_id(pod.id)} is ready: stop it first (stopp) or use -f")
            async with progress.step(f"RemovePodSandbox {output.short_id(pod.id)}", settings.progress):
                if pod.state == cri.SANDBOX_READY:
                    await client.stop_pod_sandbox(pod.id)
                await client.remove_pod_sandbox(pod.id)
            configs.forget_pod(pod.id)
            done.append(pod.id)
        return done

    _report(settings, as_json, "Removed sandbox", run_cri(settings, body))


def _report(settings: Settings, as_json: bool, verb: str, ids: list[str]) -> None:
    """The ids a command acted on: JSON for scripts, else one per line (after `verb`, if any)."""
    if settings.use_json(as_json):
        output.print_json({"ids": ids})
    else:
        for i in ids:
            click.echo(f"{verb} {i}" if verb else i)


@main.command()
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--name", help="Only pods whose name contains this.")
@click.option("--namespace", help="Only pods in this namespace.")
@click.option("--state", type=click.Choice(sorted(POD_STATES)))
@click.option("--no-trunc", is_flag=True, help="Full ids.")
@json_option
@click.pass_obj
def pods(settings: Settings, quiet: bool, name: str | None, namespace: str | None, state: str | None,
         no_trunc: bool, as_json: bool) -> None:
    """List pod sandboxes."""
    flt = cri.PodSandboxFilter()
    if state:
        flt.state.state = POD_STATES[state]
    response = run_cri(settings, lambda client: client.list_pod_sandbox(flt))
    items = [p for p in response.items
             if (not name or name in p.metadata.name) and (not namespace or p.metadata.namespace == namespace)]
    items.sort(key=lambda p: -p.created_at)
    if settings.use_json(as_json):
        output.print_json({"items": [output.to_dict(p) for p in items]})
    elif quiet:
        for p in items:
            click.echo(p.id)
    else:
        output.table(["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"],
                     [[output.short_id(p.id, no_trunc), output.age(p.created_at),
                       cri.PodSandboxState.Name(p.state).removeprefix("SANDBOX_"), p.metadata.name,
                       p.metadata.namespace, p.metadata.attempt, p.runtime_handler or "(default)"] for p in items])


@main.command()
@click.argument("pod")
@click.pass_obj
def inspectp(settings: Settings, pod: str) -> None:
    """Show a pod's status and containerd's verbose info, as JSON."""

    async def body(client: CriClient) -> cri.PodSandboxStatusResponse:
        found = await resolve_pod(client, pod)
        return await client.pod_sandbox_status(found.id, verbose=True)

    output.print_json(_with_info(run_cri(settings, body)))


def _with_info(response: Any) -> dict[str, Any]:
    data = output.to_dict(response)
    info = {}
    for key, value in response.info.items():
        try:
            info[key] = json.loads(value)
        except ValueError:
            info[key] = value
    data["info"] = info
    return data


# -- containers ------------------------------------------------------------------------------------
class CommandWithDashes(click.Command):
    """Click hands the words after `--` to a nargs=-1 argument together with the positionals before it;
    this remembers how many there were (in ctx.meta[AFTER_DASHES]), as they are never options or files."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[AFTER_DASHES] = len(args) - args.index("--") - 1 if "--" in args else 0
        return super().parse_args(ctx, args)


def split_create_args(args: Sequence[str], after_dashes: int) -> tuple[list[str], list[str]]:
    """(config files, command) of `create POD [container.json [pod.json]] [-- COMMAND...]`: the files are
    the existing *.json among the first two words, as a leading run that stops before the first other word
    and before `--` (`create POD --image busybox -- cat data.json` runs `cat data.json`)."""
    before_dashes = len(args) - min(after_dashes, len(args))
    files: list[str] = []
    for arg in args[:min(2, before_dashes)]:
        if not arg.endswith(".json"):
            break
        if not Path(arg).is_file():
            # crictl's "no such file": taken for the command, a mistyped name ran as one.
            raise click.UsageError(f"{arg}: no such config file (a command goes after `--`)")
        files.append(arg)
    return files, list(args[len(files):])


@main.command(cls=CommandWithDashes, context_settings={"ignore_unknown_options": False})
@click.argument("pod")
@click.argument("args", nargs=-1)
@click.option("--image", help="Image reference.")
@click.option("--name", help="Container name [default: from the image].")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE")
@click.option("--workdir")
@click.option("-t", "--tty", is_flag=True, default=None)
@click.option("-i", "--stdin", is_flag=True, default=None)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Container config JSON.")
@click.option("--pod-config", "pod_file", type=click.Path(dir_okay=False), help="The pod's config JSON.")
@click.option("--start", "start_too", is_flag=True, help="Start it too.")
@json_option
@click.pass_obj
def create(settings: Settings, pod: str, args: tuple[str, ...], image: str | None, name: str | None,
           envs: tuple[str, ...], workdir: str | None, tty: bool | None, stdin: bool | None,
           labels: tuple[str, ...], config_file: str | None, pod_file: str | None, start_too: bool,
           as_json: bool) -> None:
    """Create a container in a pod: `create POD [container.json [pod.json]] [flags] [-- COMMAND...]`.

    Without a pod config file, the config `runp` used is taken (kuasar-ctl remembers it under
    $KUASAR_CTL_STATE or /run/kuasar/ctl), else rebuilt from the pod's status (kubelet's log directory).
    """
    files, command = split_create_args(args, click.get_current_context().meta.get(AFTER_DASHES, 0))
    config_file = config_file or (files[0] if files else None)
    pod_file = pod_file or (files[1] if len(files) > 1 else None)

    async def body(client: CriClient) -> str:
        found = await resolve_pod(client, pod)
        if pod_file:
            pod_config = configs.pod_config(pod_file)
        else:
            pod_config = configs.remembered_pod(found.id)
            if pod_config is None:
                status = await client.pod_sandbox_status(found.id, verbose=True)
                pod_config = (configs.pod_config_from_status(status)
                              or configs.pod_config_from_pod_status(status.status))
        config = configs.container_config(config_file, name=name, image=image, command=command,
                                          env=configs.parse_pairs(envs, "--env"), workdir=workdir, tty=tty,
                                          stdin=stdin, labels=configs.parse_pairs(labels, "--label"),
                                          pod=pod_config)
        async with progress.step(f"CreateContainer {config.metadata.name}", settings.progress):
            cid = (await client.create_container(found.id, config, pod_config)).container_id
        if start_too:
            async with progress.step(f"StartContainer {output.short_id(cid)}", settings.progress):
                await client.start_container(cid)
        return cid

    cid = run_cri(settings, body)
    if settings.use_json(as_json):
        output.print_json({"id": cid})
    else:
        click.echo(cid)


@main.command()
@click.argument("containers", nargs=-1, required=True)
@json_option
@click.pass_obj
def start(settings: Settings, containers: tuple[str, ...], as_json: bool) -> None:
    """Start created containers."""

    async def body(client: CriClient) -> list[str]:
        done = []
        for prefix in containers:
            container = await resolve_container(client, prefix)
            async with progress.step(f"StartContainer {output.short_id(container.id)}", settings.progress):
                await client.start_container(container.id)
            done.append(container.id)
        return done

    _report(settings, as_json, "", run_cri(settings, body))


@main.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-t", "--timeout", "grace", type=SECONDS, default=10, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
@json_option
@click.pass_obj
def stop(settings: Settings, containers: tuple[str, ...], grace: int, as_json: bool) -> None:
    """Stop running containers."""

    async def body(client: CriClient) -> list[str]:
        done = []
        for prefix in containers:
            container = await resolve_container(client, prefix)
            async with progress.step(f"StopContainer {output.short_id(container.id)}", settings.progress):
                await client.stop_container(container.id, grace)
            done.append(container.id)
        return done

    _report(settings, as_json, "", run_cri(settings, body))


@main.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Stop running containers first.")
@json_option
@click.pass_obj
def rm(settings: Settings, containers: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Remove containers."""

    async def body(client: CriClient) -> list[str]:
        done = []
        for prefix in containers:
            container = await resolve_container(client, prefix)
            if container.state == cri.CONTAINER_RUNNING:
                if not force:
                    raise click.ClickException(f"container {output.short_id(container.id)} is running: "
                                               "stop it first or use -f")
                await client.stop_container(container.id, 0)
            await client.remove_container(container.id)
            done.append(container.id)
        return done

    _report(settings, as_json, "", run_cri(settings, body))


@main.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Also created and exited containers.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("-p", "--pod", help="Only containers of this pod (id or prefix).")
@click.option("--name", help="Only containers whose name contains this.")
@click.option("--state", type=click.Choice(sorted(CONTAINER_STATES)))
@click.option("--no-trunc", is_flag=True)
@json_option
@click.pass_obj
def ps(settings: Settings, show_all: bool, quiet: bool, pod: str | None, name: str | None, state: str | None,
       no_trunc: bool, as_json: bool) -> None:
    """List containers (running ones unless -a)."""

    async def body(client: CriClient) -> tuple[list[cri.Container], dict[str, cri.PodSandbox]]:
        flt = cri.ContainerFilter()
        if pod:
            flt.pod_sandbox_id = (await resolve_pod(client, pod)).id
        if state:
            flt.state.state = CONTAINER_STATES[state]
        elif not show_all:
            flt.state.state = cri.CONTAINER_RUNNING
        containers = list((await client.list_containers(flt)).containers)
        pods = {p.id: p for p in (await client.list_pod_sandbox()).items}
        return containers, pods

    containers, pods_by_id = run_cri(settings, body)
    containers = [c for c in containers if not name or name in c.metadata.name]
    containers.sort(key=lambda c: -c.created_at)
    if settings.use_json(as_json):
        output.print_json({"containers": [output.to_dict(c) for c in containers]})
    elif quiet:
        for c in containers:
            click.echo(c.id)
    else:
        rows = []
        for c in containers:
            pod_name = pods_by_id[c.pod_sandbox_id].metadata.name if c.pod_sandbox_id in pods_by_id else ""
            rows.append([output.short_id(c.id, no_trunc), c.image.image or c.image_ref, output.age(c.created_at),
                         cri.ContainerState.Name(c.state).removeprefix("CONTAINER_"), c.metadata.name,
                         c.metadata.attempt, output.short_id(c.pod_sandbox_id, no_trunc), pod_name])
        output.table(["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID", "POD"], rows)


@main.command()
@click.argument("container")
@click.pass_obj
def inspect(settings: Settings, container: str) -> None:
    """Show a container's status and containerd's verbose info, as JSON."""

    async def body(client: CriClient) -> cri.ContainerStatusResponse:
        found = await resolve_container(client, container)
        return await client.container_status(found.id, verbose=True)

    output.print_json(_with_info(run_cri(settings, body)))


# Everything after CONTAINER is the command, as with crictl: its own flags (`ls -la`, `sh -c`, `curl
# --timeout 5`) are never taken for ours.
@main.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("command", nargs=-1, required=True)
@click.option("--timeout", "exec_timeout", type=SECONDS, default=0,
              help="Seconds before containerd kills it (0: none).")
@click.option("-i", "--interactive", is_flag=True, help="Not supported: interactive sessions need crictl.")
@click.option("-t", "--tty", is_flag=True, help="Not supported: interactive sessions need crictl.")
@json_option
@click.pass_obj
def exec_(settings: Settings, container: str, command: tuple[str, ...], exec_timeout: int, interactive: bool,
          tty: bool, as_json: bool) -> None:
    """Run a command in a container and wait for it: `exec CONTAINER -- CMD [ARGS...]`.

    Its stdout and stderr are printed and its exit code becomes ours.
    """
    if interactive or tty:
        raise click.ClickException("interactive exec (-i/-t) is not available in kuasar-ctl; "
                                   "use `crictl exec -it` for a terminal session")
    if command[0] == "--":  # `exec C -- CMD`: click keeps the `--` once options have ended
        command = command[1:]
    if not command:
        raise click.UsageError("no command to run: exec CONTAINER [--] CMD [ARGS...]")

    async def body(client: CriClient) -> cri.ExecSyncResponse:
        found = await resolve_container(client, container)
        # CriClient.exec_sync always keeps a deadline (a hung exec must not hang a test run); here the
        # user decides, so the raw stub: none for --timeout 0, as with crictl.
        request = cri.ExecSyncRequest(container_id=found.id, cmd=list(command), timeout=exec_timeout)
        return await client.runtime.ExecSync(request, timeout=exec_deadline(exec_timeout))

    response = run_cri(settings, body)
    if settings.use_json(as_json):
        output.print_json({"exit_code": response.exit_code, "stdout": response.stdout.decode(errors="replace"),
                           "stderr": response.stderr.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(response.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(response.stderr)
        sys.stderr.buffer.flush()
    sys.exit(response.exit_code)


def exec_deadline(exec_timeout: int) -> float | None:
    """The ExecSync RPC deadline: none when containerd lets the command run for ever (0), else containerd's
    timeout plus a grace, so containerd reports the timeout (with the output so far) before we cut the call."""
    return None if exec_timeout == 0 else exec_timeout + EXEC_SYNC_GRACE_S


@main.command(name="logs")
@click.argument("container")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the container exits.")
@click.option("--tail", type=int, default=None, help="Only the last N lines.")
@click.option("--timestamps", is_flag=True)
@click.pass_obj
def logs_(settings: Settings, container: str, follow: bool, tail: int | None, timestamps: bool) -> None:
    """Print a container's log (stdout to stdout, stderr to stderr)."""

    async def body(client: CriClient) -> None:
        found = await resolve_container(client, container)
        status = (await client.container_status(found.id)).status
        if not status.log_path:
            raise click.ClickException(f"container {output.short_id(found.id)} has no log path")

        async def running() -> bool:
            try:
                return (await client.container_status(found.id)).status.state == cri.CONTAINER_RUNNING
            except grpc.aio.AioRpcError:
                return False

        try:
            await logs.show(status.log_path, tail=tail, timestamps=timestamps, follow=follow,
                            still_running=running)
        except logs.LogFileError as exc:
            raise click.ClickException(str(exc)) from None

    run_cri(settings, body)


# -- images ----------------------------------------------------------------------------------------
@main.command()
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--no-trunc", is_flag=True)
@json_option
@click.pass_obj
def images(settings: Settings, quiet: bool, no_trunc: bool, as_json: bool) -> None:
    """List images."""
    response = run_cri(settings, lambda client: client.list_images())
    if settings.use_json(as_json):
        output.print_json({"images": [output.to_dict(i) for i in response.images]})
        return
    if quiet:
        for image in response.images:
            click.echo(image.id)
        return
    rows = []
    for image in response.images:
        image_id = image.id.removeprefix("sha256:")
        image_id = image_id if no_trunc else image_id[:13]
        tags = list(image.repo_tags) or [f"{d.split('@')[0]}:<none>" for d in image.repo_digests] or ["<none>:<none>"]
        for tag in tags:
            repo, _, version = tag.rpartition(":")
            rows.append([repo, version, image_id, output.human_size(image.size)])
    output.table(["IMAGE", "TAG", "IMAGE ID", "SIZE"], rows)


@main.command()
@click.argument("image")
@json_option
@click.pass_obj
def pull(settings: Settings, image: str, as_json: bool) -> None:
    """Pull an image (through containerd)."""

    async def body(client: CriClient) -> str:
        async with progress.step(f"PullImage {image}", settings.progress):
            return (await client.pull_image(image)).image_ref

    ref = run_cri(settings, body)
    if settings.use_json(as_json):
        output.print_json({"image_ref": ref})
    else:
        click.echo(f"Image is up to date for {ref}")


@main.command()
@json_option
@click.pass_obj
def version(settings: Settings, as_json: bool) -> None:
    """The CRI runtime's name and version (and ours)."""
    response = run_cri(settings, lambda client: client.version())
    if settings.use_json(as_json):
        data = output.to_dict(response)
        data["kuasar_ctl_version"] = __version__
        output.print_json(data)
    else:
        output.table(["", ""], [["kuasar-ctl", __version__], ["RuntimeName", response.runtime_name],
                                ["RuntimeVersion", response.runtime_version],
                                ["RuntimeApiVersion", response.runtime_api_version]])


# -- sandboxers, directly --------------------------------------------------------------------------
def sandboxer_refs(kinds: tuple[str, ...], address: str | None, directory: str | None) -> list[sandboxers.SandboxerRef]:
    if address or directory:
        if len(kinds) != 1:
            raise click.ClickException("--address/--dir need exactly one --type")
        ref = sandboxers.default_ref(kinds[0])
        return [sandboxers.SandboxerRef(kinds[0], address or ref.socket, directory or ref.directory)]
    return [sandboxers.default_ref(k) for k in (kinds or sandboxers.KINDS)]


def sandboxer_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--dir", "directory", help="The sandboxer's --dir (state directory).")(f)
    f = click.option("--address", help="The sandboxer's --listen socket.")(f)
    return click.option("--type", "kinds", multiple=True, type=click.Choice(sandboxers.KINDS),
                        help="Sandboxer type(s) [default: all].")(f)


@main.group(name="sandboxes")
def sandboxes_group() -> None:
    """Sandboxes as the sandboxers see them (their state directories and Controller sockets)."""


@sandboxes_group.command(name="ls")
@sandboxer_options
@click.option("--no-trunc", is_flag=True)
@json_option
@click.pass_obj
def sandboxes_ls(settings: Settings, kinds: tuple[str, ...], address: str | None, directory: str | None,
                 no_trunc: bool, as_json: bool) -> None:
    """List every sandbox of the local sandboxers (live state when the sandboxer answers)."""
    try:
        rows = sandboxers.list_sandboxes(sandboxer_refs(kinds, address, directory))
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    rows.sort(key=lambda r: -r.created_at_ns)
    if settings.use_json(as_json):
        output.print_json({"sandboxes": [r.to_json() for r in rows]})
        return
    output.table(["SANDBOX ID", "TYPE", "STATE", "PID", "CREATED", "POD", "ADDRESS"],
                 [[output.short_id(r.id, no_trunc), r.kind, r.state + ("" if r.live else " (state file)"), r.pid or "-",
                   output.age(r.created_at_ns), f"{r.namespace}/{r.name}" if r.name else "-", r.address or "-"]
                  for r in rows])


@main.group(name="sandbox")
def sandbox_group() -> None:
    """One sandbox, straight from its sandboxer."""


@sandbox_group.command(name="status")
@click.argument("sandbox_id")
@sandboxer_options
@json_option
@click.pass_obj
def sandbox_status(settings: Settings, sandbox_id: str, kinds: tuple[str, ...], address: str | None,
                   directory: str | None, as_json: bool) -> None:
    """Controller.Status (verbose) of one sandbox (id or unique prefix)."""
    refs = sandboxer_refs(kinds, address, directory)
    try:
        ref, full_id = sandboxers.find(refs, sandbox_id)
        with sandboxers.SandboxerClient(ref.socket) as client:
            status = client.status(full_id, verbose=True)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    except grpc.RpcError as exc:
        raise click.ClickException(f"{ref.kind} sandboxer: {exc.details()} ({exc.code().name})") from None  # type: ignore[attr-defined]
    data = output.to_dict(status)
    data["type"] = ref.kind
    if settings.use_json(as_json):
        output.print_json(data)
        return
    rows = [["id", status.sandbox_id], ["type", ref.kind], ["state", status.state], ["pid", status.pid],
            ["address", status.address], ["version", status.version],
            ["created", output.age(status.created_at.ToNanoseconds())]]
    if status.HasField("exited_at") and status.exited_at.ToNanoseconds():
        rows.append(["exited", output.age(status.exited_at.ToNanoseconds())])
    rows += [[f"info.{k}", v] for k, v in sorted(status.info.items())]
    output.table(["FIELD", "VALUE"], rows)


@sandbox_group.command(name="shell")
@click.argument("sandbox_id")
@sandboxer_options
@click.pass_obj
def sandbox_shell(settings: Settings, sandbox_id: str, kinds: tuple[str, ...], address: str | None,
                  directory: str | None) -> None:
    """A shell in a VM pod's guest, through the agent's debug console (vmm pods only)."""
    refs = sandboxer_refs(kinds, address, directory)
    try:
        ref, full_id = sandboxers.find(refs, sandbox_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    if ref.kind != "vmm":
        raise click.ClickException(f"sandbox {output.short_id(full_id)} is a {ref.kind} pod: it has no guest; "
                                   "use `kuasar-ctl exec` on one of its containers")
    raise click.ClickException("a shell in the guest needs vmm-sandboxer's debug console, which is not "
                               "available in this release")


if __name__ == "__main__":
    main()
