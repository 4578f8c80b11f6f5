"""The `[quark]` section of quark-sandboxer's configuration file.

```toml
[quark]
backend = "quark"        # "quark" (Kuasar's Quark driver) or "runsc" (gVisor)
quark = "quark"          # the Quark binary (PATH lookup unless it contains a "/")
runsc = "runsc"          # gVisor's runsc binary
platform = "systrap"     # runsc --platform: systrap (no hardware virtualisation needed), ptrace, kvm
network = "auto"         # pods with their own netns: "sandbox" (gVisor netstack), "host" (hostinet), "auto"
host_network = "none"    # host-network pods: "none" (loopback only) or "host" (the host's stack, hostinet)
debug = false            # runsc --debug, logs under <dir>/runsc-debug/
control_timeout = 30     # seconds a sandbox has to answer a runsc kill/delete/state/...; one that does
                         # not is wedged: a kill or delete it ignores ends it (SIGKILL)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kuasar.common.config import DaemonConfig
from kuasar.common.errors import InvalidArgument

BACKENDS = ("quark", "runsc")
PLATFORMS = ("systrap", "ptrace", "kvm")
NETWORK_MODES = ("auto", "sandbox", "host")
HOST_NETWORK_MODES = ("none", "host")

# How long a command that asks a running sandbox something (kill, delete, state, pause, ...) may take:
# the sentry answers in milliseconds, and runsc waits for ever on one that is wedged (its control
# socket accepts, nobody answers). Well below kubelet's 2 min runtime request timeout.
CONTROL_TIMEOUT = 30.0


@dataclass(frozen=True)
class QuarkConfig:
    backend: str = "quark"
    quark: str = "quark"
    runsc: str = "runsc"
    platform: str = "systrap"
    network: str = "auto"
    host_network: str = "none"
    debug: bool = False
    control_timeout: float = CONTROL_TIMEOUT

    @classmethod
    def from_daemon(cls, config: DaemonConfig) -> QuarkConfig:
        return cls.from_section(config.section("quark"))

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> QuarkConfig:
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidArgument(f"unknown keys in [quark]: {', '.join(sorted(unknown))}")
        values = cls(**{k: v for k, v in section.items()})
        for name, allowed in (("backend", BACKENDS), ("platform", PLATFORMS), ("network", NETWORK_MODES),
                              ("host_network", HOST_NETWORK_MODES)):
            value = getattr(values, name)
            if value not in allowed:
                raise InvalidArgument(f"[quark] {name} = {value!r}: must be one of {', '.join(allowed)}")
        for name in ("quark", "runsc"):
            if not isinstance(getattr(values, name), str) or not getattr(values, name):
                raise InvalidArgument(f"[quark] {name} must be a non-empty string")
        if not isinstance(values.debug, bool):
            raise InvalidArgument("[quark] debug must be true or false")
        timeout = values.control_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise InvalidArgument(f"[quark] control_timeout = {timeout!r}: must be a number of seconds above 0")
        return values
