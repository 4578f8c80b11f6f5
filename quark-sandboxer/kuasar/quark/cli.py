"""`quark-sandboxer`: the resident daemon's CLI, backend `quark` or `runsc` (the daemon proper is
kuasar.common.daemon_main with backends.make_sandboxer; the runsc backend's task server is
`quark-task-server`, task_server_main.py)."""

from __future__ import annotations

from kuasar.common.cli import sandboxer_command

main = sandboxer_command("quark", "/run/kuasar/quark-sandboxer.sock", "/run/kuasar-quark",
                         "kuasar.quark.backends:make_sandboxer")


if __name__ == "__main__":
    main()
