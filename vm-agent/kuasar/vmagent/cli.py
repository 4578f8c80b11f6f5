"""`vm-agent`: the guest agent's command line, plus host-side helpers to build, boot and poke the image.

In the guest the image's `/init` calls `kuasar.vmagent.agent.init_main` directly (no click there);
run as PID 1, `vm-agent` with no arguments does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from kuasar.common import tools
from kuasar.common.errors import KuasarError

from . import __version__

# Where `make guest-image` builds it in a checkout; where `make install` puts it beside an installed binary
# (<prefix>/bin -> <prefix>/share/kuasar/guest), never below the frozen binary's unpacked modules.
DEFAULT_IMAGE = (tools.installed_dir().parent / "share" / "kuasar" / "guest" if tools.frozen()
                 else tools.CHECKOUT / "build" / "guest")  # (installed_dir: <prefix>/bin)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vm-agent")
@click.pass_context
def main(ctx: click.Context) -> None:
    """The guest agent of vmm-sandboxer's micro-VMs (PID 1 in the guest)."""
    if ctx.invoked_subcommand is None:
        if os.getpid() == 1:
            from .agent import init_main

            init_main()
        click.echo(ctx.get_help())


@main.command("init")
def init_command() -> None:
    """Run as the guest's PID 1 (what the image's /init does)."""
    if os.getpid() != 1:
        raise click.ClickException("init only runs as PID 1 inside the guest (try `vm-agent serve` on a host)")
    from .agent import init_main

    init_main()


@main.command()
@click.option("--listen", required=True, help="Unix socket to serve Task, Streaming and Agent on.")
@click.option("--share", default="", help="Directory holding bundles (<share>/<container id>).")
@click.option("--state-dir", default="/run/vmagent-host", show_default=True)
@click.option("--runc", "runc_binary", default="runc", show_default=True)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def serve(listen: str, share: str, state_dir: str, runc_binary: str, log_level: str) -> None:
    """Serve the agent's services on a host (no PID-1 duties): for development and tests."""
    from .agent import _setup_logging, serve_unix
    from .config import AgentConfig

    _setup_logging(log_level)
    config = AgentConfig(state_dir=state_dir, runc=runc_binary)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_unix(listen, config, share))


@main.command("build-image")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_IMAGE, show_default=True)
@click.option("--kernel-package", default=None, help="Debian kernel package (default: linux-image-amd64's).")
@click.option("--compression", type=click.Choice(["none", "lz4"]), default="none", show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if the inputs did not change.")
def build_image(out: Path, kernel_package: str | None, compression: str, force: bool) -> None:
    """Build the guest image (same as `make guest-image`)."""
    from .imagebuild.builder import BuildError, Options, build

    try:
        build(Options(out_dir=out, kernel_package=kernel_package, compression=compression, force=force))
    except BuildError as err:
        raise click.ClickException(str(err)) from None


@main.command()
@click.option("--image", type=click.Path(path_type=Path), default=DEFAULT_IMAGE, show_default=True)
@click.option("--share", type=click.Path(path_type=Path), default=None, help="Host directory shared over 9p.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Sockets and console log.")
@click.option("--memory", default=512, show_default=True, help="Guest memory in MiB.")
@click.option("--debug", is_flag=True, help="Enable the guest's debug console (vsock port 1025).")
@click.option("--exec", "command", multiple=True, help="Run this argv in the guest (repeat per word), then power off.")
def boot(image: Path, share: Path | None, workdir: Path | None, memory: int, debug: bool,
         command: tuple[str, ...]) -> None:
    """Boot the image under QEMU (TCG) and report start-up figures; Ctrl-C powers it off."""
    from kuasar.common.api.kuasar.agent.v1 import agent_pb2 as pb
    from kuasar.common.tools import find_tool

    from .launch import MicroVm, VmConfig

    try:
        manifest = json.loads((image / "manifest.json").read_text())
        kernel, initramfs = image / "vmlinux", image / manifest["initramfs"]["file"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"{image} is not a guest image (make guest-image builds one): {exc}") from None
    work = workdir or Path(tempfile.mkdtemp(prefix="vmagent-", dir="/tmp"))  # short: unix socket paths
    config = VmConfig(kernel, initramfs, work, share_dir=share,
                      memory_mb=memory, debug_console=debug,
                      vhost_vsock=find_tool("vhost-device-vsock") or "vhost-device-vsock")
    vm = MicroVm(config)

    async def run() -> int:
        status = 0
        try:
            await vm.start()
            client = await vm.connect()
            check = await client.call("kuasar.agent.v1.Agent", "Check", pb.CheckRequest(), pb.CheckResponse,
                                      timeout=10)
            click.echo(f"agent ready {vm.times.to_ready:.2f} s after QEMU started (guest: /init at "
                       f"{check.agent_started_ns / 1e9:.2f} s, serving at {check.agent_ready_ns / 1e9:.2f} s)")
            click.echo(f"hybrid vsock socket: {config.uds}  console log: {config.console_log}")
            if command:
                result = await client.call("kuasar.agent.v1.Agent", "ExecVMProcess",
                                           pb.ExecVMProcessRequest(args=list(command)), pb.ExecVMProcessResponse,
                                           timeout=120)
                sys.stdout.buffer.write(result.stdout)
                sys.stderr.buffer.write(result.stderr)
                status = result.exit_status
            else:
                if debug:
                    click.echo(f"debug shell: vm-agent console {config.uds}")
                click.echo("Ctrl-C to power off")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
            await client.call("kuasar.agent.v1.Agent", "Poweroff", pb.PoweroffRequest(), timeout=30)
            await vm.wait_exit(30)
            await client.close()
        finally:
            await vm.stop()
        return status

    status = 130
    try:
        status = asyncio.run(run())
    except KeyboardInterrupt:
        asyncio.run(vm.stop())
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(status)


@main.command()
@click.argument("uds", type=click.Path())
@click.option("--port", default=1025, show_default=True)
def console(uds: str, port: int) -> None:
    """Attach this terminal to the guest's debug console (booted with `task.debug`)."""
    import termios
    import tty

    from kuasar.common import hvsock

    async def run() -> None:
        reader, writer = await hvsock.connect(uds, port)
        loop = asyncio.get_running_loop()
        stdin_reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin_reader), sys.stdin)

        async def upstream() -> None:
            while data := await stdin_reader.read(4096):
                writer.write(data)
                await writer.drain()

        up = asyncio.create_task(upstream())
        try:
            while data := await reader.read(4096):
                os.write(sys.stdout.fileno(), data)
        finally:
            up.cancel()
            writer.close()

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved is not None:
            tty.setraw(fd)
        asyncio.run(run())
    except (OSError, KuasarError) as exc:  # no such socket, nobody at that port
        raise click.ClickException(f"the guest's console at {uds}:{port}: {getattr(exc, 'message', exc)}") from None
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


if __name__ == "__main__":
    main()
