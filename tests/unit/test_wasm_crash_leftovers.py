"""What a wasm task server killed with `kill -9` leaves, and what its successor (or its own process
model) does about it: container processes die with it even while they compile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kuasar.common.proc_stat import exited, start_time

# A task server that launches one container process whose module takes 5 s to compile (wasmtime on a
# large module under a CPU limit), then waits; it prints the container process's pid.
SLOW_COMPILE_SERVER = r'''
import asyncio, time
from kuasar.wasm import launch as L
from kuasar.wasm.runner import RunSpec
from kuasar.common.reaper import Reaper

class SlowCompile:
    def __init__(self, run):
        time.sleep(5)
    def run(self):
        return 0

L.WasmtimeModule = SlowCompile

async def main():
    reaper = Reaper()
    reaper.install()
    started = L.launch(L.LaunchPlan("c1", "wasmtime", RunSpec("/x.wasm", ["/x.wasm"], [])), L.Stdio(), reaper, True)
    print(started.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
'''


def test_a_wasm_container_process_dies_with_its_task_server_while_it_compiles() -> None:
    # Its death signal was set only once the module was compiled: a task server killed meanwhile left it
    # compiling, then running, in the pod's cgroup and namespaces, known to nobody.
    server = subprocess.Popen([sys.executable, "-c", SLOW_COMPILE_SERVER], stdout=subprocess.PIPE)
    assert server.stdout is not None
    child = int(server.stdout.readline())
    started = start_time(child)
    try:
        time.sleep(0.3)  # the child is compiling
        server.kill()
        server.wait()
        deadline = time.monotonic() + 2
        while start_time(child) == started and not exited(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert start_time(child) != started or exited(child), "the container process outlived its task server"
    finally:
        server.stdout.close()
        if start_time(child) == started:
            os.kill(child, signal.SIGKILL)
