"""`quark-sandboxer`: the resident daemon's CLI, backend `quark` or `runsc` (the daemon proper is
kuasar.common.daemon_main with backends.make_sandboxer; the runsc backend's task server is
`quark-task-server`, task_server_main.py). `task-relay` is the per-sandbox relay in front of QVisor
that the quark backend starts itself (see kuasar.quark.task_relay)."""

from __future__ import annotations

import sys

import click

from kuasar.common.cli import sandboxer_command

main = sandboxer_command("quark", "/run/kuasar/quark-sandboxer.sock", "/run/kuasar-quark",
                         "kuasar.quark.backends:make_sandboxer")


@main.command("task-relay", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def task_relay(args: tuple[str, ...]) -> None:
    """The task endpoint of one Quark sandbox (started by the sandboxer)."""
    from .task_relay import main as relay_main

    sys.exit(relay_main(list(args)))


if __name__ == "__main__":
    main()
