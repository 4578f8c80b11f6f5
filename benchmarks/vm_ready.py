#!/usr/bin/env python3
"""VM pod ready time next to the bare boot of the same guest, measured in one run (needs root).

    .venv/bin/python benchmarks/vm_ready.py [--runs 5] [--config vmm.toml] [--json out.json]

Two things, alternated round by round so that drift on a shared machine hits both alike:

* **bare boot**: QEMU with the sandboxer's own settings (machine, accelerator, CPU, memory, the
  same kernel and initramfs, the same kernel command line) but `rdinit=/bin/sh` and no devices: the
  time from spawning QEMU to a shell answering on the serial console;
* **pod ready**: `RunPodSandbox` through containerd 2.x's CRI for a CNI-networked pod served by
  vmm-sandboxer (a private containerd and sandboxer are started for the run), i.e. everything a
  kubelet waits for: netns and CNI, taps, vhost-device-vsock, QEMU, the guest agent's READY,
  SetupSandbox, the task proxy.

Prints a Markdown table (median, min, max) and the pod's own breakdown as the sandboxer recorded it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from kuasar.common.cri_client import CriClient, pod_config  # noqa: E402
from kuasar.vmm.accel import read_tsc_khz  # noqa: E402
from kuasar.vmm.config import find_program, parse_config  # noqa: E402
from kuasar.vmm.hypervisor import VmSpec  # noqa: E402
from kuasar.vmm.qemu import qemu_command  # noqa: E402
from tests.support import containerd as cd  # noqa: E402

HANDLER = "kuasar-vmm"
MARKER = b"BARE-42-READY"
PROBE = b"echo BARE-$((6*7))-READY\n"
STANDALONE_FLAGS = {"-no-reboot", "-no-user-config", "-nodefaults"}


GUEST_DIR = REPO / "build" / "guest"


def built_image() -> tuple[str, str] | None:
    """The guest kernel and initramfs `make guest-image` left in build/guest/, without building."""
    try:
        manifest = json.loads((GUEST_DIR / "manifest.json").read_text())
        kernel, initrd = GUEST_DIR / "vmlinux", GUEST_DIR / manifest["initramfs"]["file"]
    except (OSError, ValueError, KeyError):
        return None
    return (str(kernel), str(initrd)) if kernel.is_file() and initrd.is_file() else None


def skip_reason() -> str | None:
    """Why the VM measurement cannot run here (without building anything), or None."""
    if os.geteuid() != 0:
        return "needs root (containerd, CNI, QEMU with taps)"
    if built_image() is None:
        return "no guest image in build/guest/ (`make guest-image` builds it)"
    import tomllib

    config = parse_config(tomllib.loads('[hypervisor]\nkernel_path = "k"\ninitrd_path = "i"\n')["hypervisor"])
    if not (find_program(config.qemu_path) or shutil.which(config.qemu_path)):
        return f"QEMU ({config.qemu_path}) is not installed"
    if not shutil.which("vhost-device-vsock"):
        return "vhost-device-vsock is not on PATH (`make setup` installs it into .prefix/bin)"
    return cd.skip_reason()


def image_paths() -> tuple[str, str]:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_guest_image.py")],
                            capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        sys.exit(f"guest image build failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((REPO / "build" / "guest" / "manifest.json").read_text())
    return str(REPO / "build" / "guest" / "vmlinux"), str(REPO / "build" / "guest" / manifest["initramfs"]["file"])


def bare_argv(config_text: str, accel: str, workdir: Path) -> list[str]:
    """The sandboxer's QEMU command line without devices, console on stdio, a shell as init."""
    import tomllib

    config = parse_config(tomllib.loads(config_text).get("hypervisor", {}))
    spec = VmSpec(sandbox_id="bare", vm_dir=workdir, kernel=config.kernel_path, initrd=config.initrd_path,
                  vcpus=config.vcpus, memory_mb=config.memory_in_mb, accel=accel,
                  tsc_khz=read_tsc_khz(config.tsc_khz), share_fs="none")
    argv = qemu_command(config, spec, find_program(config.qemu_path) or config.qemu_path)
    out, i = [argv[0]], 1
    while i < len(argv):
        flag = argv[i]
        if flag in STANDALONE_FLAGS:
            out.append(flag)
            i += 1
            continue
        value = argv[i + 1]
        i += 2
        if flag in ("-chardev", "-qmp") or (flag == "-device" and "vsock" in value):
            continue  # no vsock daemon, no QMP: the bare guest has no agent to talk to
        if flag == "-serial":
            value = "stdio"
        elif flag == "-append":
            value += " rdinit=/bin/sh"
        out += [flag, value]
    return out


async def bare_boot(argv: list[str], timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""

    async def poke() -> None:
        while True:
            proc.stdin.write(PROBE)
            await asyncio.sleep(0.1)

    poker = asyncio.create_task(poke())
    try:
        async with asyncio.timeout(timeout):
            while MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    raise RuntimeError(f"QEMU exited: {seen[-500:]!r}")
                seen = (seen + chunk)[-8192:]
        elapsed = time.monotonic() - t0
    finally:
        poker.cancel()
        proc.stdin.write(b"poweroff -f\n")
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return elapsed


async def pod_ready(client: CriClient, log_dir: Path, directory: Path) -> tuple[float, dict]:
    uid = uuid.uuid4().hex[:12]
    config = pod_config("bench", uid=uid, host_network=False, log_directory=str(log_dir / uid), hostname="bench")
    t0 = time.monotonic()
    pod_id = (await client.run_pod_sandbox(config, runtime_handler=HANDLER)).pod_sandbox_id
    elapsed = time.monotonic() - t0
    state = json.loads((directory / "sandboxes" / pod_id / "sandbox.json").read_text())
    await client.stop_pod_sandbox(pod_id)
    await client.remove_pod_sandbox(pod_id)
    return elapsed, state["extra"]["vm"].get("boot", {})


def start_sandboxer(socket: Path, directory: Path, config: Path, log: Path, events: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kuasar.vmm.cli", "--listen", str(socket), "--dir",
                                 str(directory), "--config", str(config), "--events-address", events],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vmm-sandboxer did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return proc


def row(name: str, values: list[float]) -> str:
    return (f"| {name} | {statistics.median(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s "
            f"| {len(values)} |")


async def measure(args: argparse.Namespace, base: Path, short: Path, *, image: tuple[str, str] | None = None,
                  warmup: int = 1, bridge: str = "kuasar-vmb0", subnet: str = "10.248.0.0/16",
                  verbose: bool = True) -> dict[str, list[float]]:
    """`warmup` unrecorded rounds, then `args.runs` rounds of bare boot + pod ready (order alternating).
    `image`: (kernel, initramfs), default: build (or reuse) the guest image first."""
    kernel, initrd = image or image_paths()
    config_text = Path(args.config).read_text() if getattr(args, "config", None) else (
        f'[hypervisor]\nkernel_path = "{kernel}"\ninitrd_path = "{initrd}"\n')
    config = base / "vmm.toml"
    config.write_text(config_text)
    instance = cd.ContainerdInstance(base / "containerd", sandboxers={"vmm": str(short / "vmm.sock")},
                                     runtimes={HANDLER: {"runtime_type": "io.containerd.kuasar-vmm.v1",
                                                         "sandboxer": "vmm", "io_type": "streaming"}},
                                     bridge=bridge, subnet=subnet, log_level="warn")
    instance.sock_dir = short / "cd"
    instance.address = str(instance.sock_dir / "containerd.sock")
    instance.ttrpc_address = str(instance.sock_dir / "containerd.sock.ttrpc")
    results: dict[str, list[float]] = {"bare": [], "pod": [], "launch": [], "ready": []}
    instance.start()
    sandboxer = None
    try:
        directory = short / "vmm"
        sandboxer = start_sandboxer(short / "vmm.sock", directory, config, base / "vmm-sandboxer.log",
                                    instance.ttrpc_address)
        accel = "tcg"
        for line in (base / "vmm-sandboxer.log").read_text().splitlines():
            if "VMs run under KVM" in line:
                accel = "kvm"
        argv = bare_argv(config_text, accel, base)
        async with CriClient(instance.address, timeout=300) as client:
            for i in range(-warmup, args.runs):  # warm-up rounds (page cache, CNI plugin binaries)
                order = ("bare", "pod") if i % 2 == 0 else ("pod", "bare")
                for what in order:
                    if what == "bare":
                        value = await bare_boot(argv)
                        if i >= 0:
                            results["bare"].append(value)
                    else:
                        value, boot = await pod_ready(client, base / "logs", directory)
                        if i >= 0:
                            results["pod"].append(value)
                            results["launch"].append(boot.get("launch_s", 0.0))
                            results["ready"].append(boot.get("ready_s", 0.0) - boot.get("launch_s", 0.0))
                    if verbose:
                        print(f"round {i}: {what} {value:.2f}s", file=sys.stderr)
        results["accel"] = [1.0 if accel == "kvm" else 0.0]
    finally:
        instance.stop()
        if sandboxer is not None:
            sandboxer.terminate()
            sandboxer.wait(20)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", help="vmm-sandboxer TOML (default: the guest image, other keys default)")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (containerd, CNI, QEMU with taps)")
    base = Path(tempfile.mkdtemp(prefix="vm-ready-"))
    short = Path(f"/run/kvb-{secrets.token_hex(2)}")
    short.mkdir(mode=0o700)
    try:
        results = asyncio.run(measure(args, base, short))
    finally:
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    accel = "KVM" if results.pop("accel", [0.0])[0] else "TCG"
    gap = [p - b for p, b in zip(results["pod"], results["bare"], strict=True)]
    print(f"\nVM pod ready vs bare boot ({accel}, {args.runs} rounds, alternating; "
          f"{os.cpu_count()} host CPUs)\n")
    print("| measurement | median | min | max | n |")
    print("|---|---|---|---|---|")
    print(row("bare boot: QEMU spawn → shell on the serial console (`rdinit=/bin/sh`)", results["bare"]))
    print(row("VM pod ready: `RunPodSandbox` through CRI (CNI pod, vmm-sandboxer)", results["pod"]))
    print(row("… of which: netns scan, taps, vhost-device-vsock, QEMU spawn, QMP, proxy spawn", results["launch"]))
    print(row("… of which: QEMU running → agent READY (kernel, /init, agent)", results["ready"]))
    print(row("pod ready − bare boot (same round)", gap))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
