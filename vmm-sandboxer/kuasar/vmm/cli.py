"""`vmm-sandboxer`: micro-VM pods (QEMU) behind containerd's Sandbox API, Kuasar's flags.

    vmm-sandboxer --listen /run/kuasar/vmm-sandboxer.sock --dir /run/kuasar-vmm --config vmm.toml

`task-proxy` is the per-VM relay the sandboxer starts itself (see kuasar.vmm.proxy).
"""

from __future__ import annotations

import sys

import click

from kuasar.common.cli import sandboxer_command

# Not lean: qemu.qmp imports ssl unconditionally (for QMP over TLS, which we never use).
main = sandboxer_command("vmm", "/run/kuasar/vmm-sandboxer.sock", "/run/kuasar-vmm",
                         "kuasar.vmm.sandboxer:VmmSandboxer", lean=False)


@main.command("task-proxy", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def task_proxy(args: tuple[str, ...]) -> None:
    """The hybrid-vsock task endpoint of one VM (started by the sandboxer)."""
    from .proxy import main as proxy_main

    sys.exit(proxy_main(list(args)))


if __name__ == "__main__":
    sys.exit(main())
