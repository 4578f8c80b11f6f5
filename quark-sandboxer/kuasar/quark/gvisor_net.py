"""Which runsc `--network` a pod gets.

* A pod with its own netns from CRI: `sandbox` puts gVisor's own network stack (netstack) in front of
  it: runsc moves the netns's addresses and routes into the sandbox. runsc releases before 2024-08 find
  out whether they were handed the host's netns by looking for /proc/sys/net/core/rmem_default, which
  newer kernels (6.x) show in every netns, so those releases refuse every pod netns ("cannot run with
  network enabled in root network namespace"). Then `host` is used: the sandbox process is started in
  the pod's netns and gVisor passes socket calls to the host kernel there (hostinet), so the pod keeps
  its CNI address and routes but the network stack is the host kernel's. `auto` picks `sandbox` when it
  works and `host` otherwise.
* A host-network pod: gVisor cannot share the host's netns with netstack; `none` gives it loopback only
  (the default: the application kernel stays isolated), `host` gives it the host's stack via hostinet.
"""

from __future__ import annotations

import os
import threading

from kuasar.common import linux

RMEM_DEFAULT = "/proc/sys/net/core/rmem_default"


def rmem_default_in_other_netns() -> bool:
    """Does a fresh netns show rmem_default? Probed in a short-lived thread, which alone enters it."""
    found: list[bool] = []

    def probe() -> None:
        try:
            linux.unshare(linux.CLONE_NEWNET)
            found.append(os.path.exists(RMEM_DEFAULT))
        except OSError:
            found.append(True)  # cannot tell: assume the kernel that breaks old runsc

    thread = threading.Thread(target=probe, name="netns-probe")
    thread.start()
    thread.join()
    return found[0] if found else True


def netstack_usable(runsc_date: int, fixed_date: int) -> bool:
    return runsc_date >= fixed_date or not rmem_default_in_other_netns()


def network_mode(own_netns: bool, configured: str, host_network: str, netstack_ok: bool) -> str:
    if not own_netns:
        return host_network
    if configured == "auto":
        return "sandbox" if netstack_ok else "host"
    return configured
