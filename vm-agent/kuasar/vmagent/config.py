"""Agent configuration from the kernel command line (`task.*` keys, as Kuasar's vmm-task reads them).

| key | default | meaning |
|---|---|---|
| `task.port=N` | 1024 | vsock port of the ttrpc services |
| `task.notify_port=N` | 1025 | host (CID 2) port told "READY" once the services listen; 0 = off |
| `task.sharefs_type=9p\\|virtiofs\\|none` | `9p` | how the host's shared directory is mounted |
| `task.share_tag=T` | `kuasar` | its mount tag |
| `task.share_dir=P` | `/run/kuasar/state` | where it is mounted |
| `task.share_cache=C` | `loose` | 9p cache mode |
| `task.forward_port=N` | 1026 | vsock port of forwarded connections (`kubectl port-forward`); 0 = off |
| `task.debug[=bool]` | off | debug console (a root shell) on vsock `task.debug_port` |
| `task.debug_port=N` | 1025 | |
| `task.debug_shell=P` | `/bin/sh` | |
| `task.log_level=L` | `info` | `debug`, `info`, `warning`, `error` |
| `task.no_pivot[=bool]` | off | run containers with `runc --no-pivot` instead of moving off the initramfs root |

Booleans take the bare form or `=1/true/yes/on` / `=0/false/no/off` (Kuasar only matched the bare form).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kuasar.common import guest_forward

PREFIX = "task."
TRUE = {"", "1", "true", "yes", "on", "y"}
FALSE = {"0", "false", "no", "off", "n"}


@dataclass
class AgentConfig:
    port: int = 1024
    notify_port: int = 1025
    forward_port: int = guest_forward.DEFAULT_PORT
    sharefs_type: str = "9p"
    share_tag: str = "kuasar"
    share_dir: str = "/run/kuasar/state"
    share_cache: str = "loose"
    debug: bool = False
    debug_port: int = 1025
    debug_shell: str = "/bin/sh"
    log_level: str = "info"
    no_pivot: bool = False
    # Not from the command line: where the image keeps things.
    modules_file: str = "/etc/vmagent/modules"
    runc: str = "/usr/bin/runc"
    state_dir: str = "/run/vmagent"

    @classmethod
    def from_cmdline(cls, cmdline: str) -> tuple[AgentConfig, list[str]]:
        """The config and a list of problems (unknown keys, bad values), which are not fatal."""
        config = cls()
        problems: list[str] = []
        types = {f.name: f.type for f in fields(cls)}
        settable = {"port", "notify_port", "forward_port", "sharefs_type", "share_tag", "share_dir", "share_cache",
                    "debug", "debug_port", "debug_shell", "log_level", "no_pivot"}
        for token in cmdline.split():
            if not token.startswith(PREFIX):
                continue
            key, _, value = token[len(PREFIX):].partition("=")
            if key not in settable:
                problems.append(f"unknown option {PREFIX}{key}")
                continue
            kind = types[key]
            try:
                if kind in (bool, "bool"):
                    low = value.lower()
                    if low not in TRUE | FALSE:
                        raise ValueError(value)
                    setattr(config, key, low in TRUE)
                elif kind in (int, "int"):
                    number = int(value)
                    if not 0 <= number < 1 << 32:
                        raise ValueError(value)
                    setattr(config, key, number)
                else:
                    setattr(config, key, value)
            except ValueError:
                problems.append(f"bad value for {PREFIX}{key}: {value!r}")
        if config.sharefs_type not in ("9p", "virtiofs", "none"):
            problems.append(f"unknown {PREFIX}sharefs_type {config.sharefs_type!r}; using 9p")
            config.sharefs_type = "9p"
        taken = {config.port} | ({config.debug_port} if config.debug else set())
        if config.forward_port in taken:  # a second listener on a port would stop the agent
            problems.append(f"{PREFIX}forward_port {config.forward_port} is taken; port forwarding off")
            config.forward_port = 0
        return config, problems
