"""Kuasar's daemon flags (`--listen`, `--dir`, `--config`, `--log-level`) as a click command factory."""

from __future__ import annotations

import os
import sys

import click

from . import __version__, daemon_main
from .config import load_config
from .errors import KuasarError
from .logs import setup_logging

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def sandboxer_command(name: str, default_listen: str, default_dir: str, factory: str,
                      lean: bool = True) -> click.Group:
    """A click group whose bare invocation serves the Sandbox API; subcommands are added by the type.

    `factory`: "module:callable" making the type's Sandboxer from a DaemonConfig. `lean`: keep
    lean.UNUSED_MODULES out of the daemon (False for a type whose libraries import them).
    """

    @click.group(name=f"{name}-sandboxer", invoke_without_command=True,
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--listen", default=default_listen, show_default=True,
                  help="Unix socket for containerd's Sandbox API (proxy_plugins address).")
    @click.option("--dir", "directory", default=default_dir, show_default=True,
                  help="Directory for sandbox state, sockets and bundles.")
    @click.option("--config", "config_path", default=None, help="TOML configuration file.")
    @click.option("--log-level", default="info", type=LOG_LEVELS, show_default=True)
    @click.option("--events-address", default=None,
                  help="containerd's ttrpc socket to publish task events to (overrides the config).")
    @click.version_option(__version__, prog_name=f"{name}-sandboxer")
    @click.pass_context
    def command(ctx: click.Context, listen: str, directory: str, config_path: str | None,
                log_level: str, events_address: str | None) -> None:
        setup_logging(log_level)
        try:
            config = load_config(listen, directory, config_path, log_level)
            if events_address is not None:
                config.events_address = events_address
        except KuasarError as exc:
            raise click.ClickException(exc.message) from None
        ctx.obj = config
        if ctx.invoked_subcommand is None:
            spec = {"name": name, "listen": str(config.listen), "dir": str(config.dir), "log_level": log_level,
                    "events_address": config.events_address, "sections": config.sections,
                    "factory": factory, "lean": lean}
            try:
                argv = daemon_main.spec_argv(spec)
            except (TypeError, ValueError) as exc:  # a TOML date or time has no JSON form
                raise click.ClickException(f"configuration: {exc}") from None
            if getattr(sys, "frozen", False):
                # A frozen binary is its own interpreter and cannot be re-run as `python -m`.
                daemon_main.run_or_exit(spec)
                return
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, argv)  # the daemon proper, without this CLI resident in it

    return command


def not_implemented_command(program: str, what: str) -> click.Command:
    """A console script for a component that is not built yet: a clear message and exit status 2."""

    @click.command(name=program, context_settings={"ignore_unknown_options": True,
                                                   "allow_extra_args": True})
    @click.version_option(__version__, prog_name=program)
    def command() -> None:
        click.echo(f"{program}: {what} is not implemented yet in this release "
                   "(see the README's status table)", err=True)
        sys.exit(2)

    return command
