#!/usr/bin/env python3
"""The main job (`make run`): containerd 2.x -> runc-sandboxer -> a pod whose container says hello.

Everything runs in a private directory (its own containerd root/state/sockets, its own sandboxer
dir) and is torn down at the end, so it leaves the machine as it found it.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kuasar.common.api.runtime.v1 import api_pb2 as cri  # noqa: E402
from kuasar.common.cri_client import CriClient  # noqa: E402
from tests.integration.conftest import kill_task_server, start_sandboxer, stop_process  # noqa: E402
from tests.integration.cri_helpers import log_text, run_pod, start_container, wait_state  # noqa: E402
from tests.support import containerd as cd  # noqa: E402
from tests.support import images  # noqa: E402

MESSAGE = "Hello from a kuasar-py pod: containerd 2.x -> runc-sandboxer -> runc"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


async def scenario(address: str, log_root: Path) -> None:
    async with CriClient(address) as client:
        version = await client.version()
        step(f"CRI runtime {version.runtime_name} {version.runtime_version}")
        started = time.monotonic()
        pod_id, pod = await run_pod(client, "demo", log_root)
        step(f"RunPodSandbox (runtime handler kuasar-runc): pod {pod_id[:12]}")
        cid = await start_container(client, pod_id, pod, "hello",
                                    ["sh", "-c", f"echo '{MESSAGE}'; echo \"hostname: $(hostname)\"; "
                                                 "uname -sr"])
        status = await wait_state(client, cid, cri.CONTAINER_EXITED)
        elapsed = (time.monotonic() - started) * 1000
        step(f"container {cid[:12]} finished with exit code {status.exit_code} ({elapsed:.0f} ms from RunPodSandbox)")
        print("---- container output (from the CRI log) ----")
        print(log_text(pod, "hello"))
        print("----------------------------------------------")
        pod_status = (await client.pod_sandbox_status(pod_id, verbose=True))
        step(f"pod state {cri.PodSandboxState.Name(pod_status.status.state)}; sandboxer info {dict(pod_status.info)}")
        await client.remove_container(cid)
        await client.stop_pod_sandbox(pod_id)
        await client.remove_pod_sandbox(pod_id)
        step("container and pod removed")


def main() -> int:
    reason = cd.skip_reason()
    if reason:
        print(f"demo: cannot run: {reason} (run `make setup` first)", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="kuasar-demo-"))
    short = Path(f"/run/kuasar-demo-{secrets.token_hex(3)}")
    short.mkdir(mode=0o700)
    sandboxer_dir = short / "runc"
    instance = cd.ContainerdInstance(base / "containerd", sandboxers={"runc": str(short / "runc.sock")},
                                     bridge="kuasar-demo0", subnet="10.239.0.0/16", log_level="info")
    sandboxer = None
    try:
        step("building the busybox image from the host's static busybox")
        tar = images.build_busybox_image(base / "busybox.tar")
        step(f"starting containerd {cd.containerd_version()} in {base}")
        instance.start()
        instance.import_image(tar)
        step("starting runc-sandboxer (proxy sandboxer 'runc')")
        sandboxer = start_sandboxer(short / "runc.sock", sandboxer_dir, base / "runc-sandboxer.log",
                                    instance.ttrpc_address)
        asyncio.run(scenario(instance.address, base / "logs"))
        return 0
    finally:
        step("tearing down")
        if sandboxer is not None:
            stop_process(sandboxer)
        instance.stop()
        kill_task_server(sandboxer_dir)
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
