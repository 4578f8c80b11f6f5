"""Kuasar's daemon flags (`--listen`, `--dir`, `--config`, `--log-level`) as a click command factory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from . import __version__
from .config import DaemonConfig, load_config
from .errors import KuasarError
from .lean import keep_out_unused_modules
from .logs import setup_logging

if TYPE_CHECKING:
    from .sandboxer import Sandboxer

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def sandboxer_command(name: str, default_listen: str, default_dir: str,
                      make_sandboxer: Callable[[DaemonConfig], Sandboxer], lean: bool = True) -> click.Group:
    """A click group whose bare invocation serves the Sandbox API; subcommands are added by the type.
    `lean`: keep lean.UNUSED_MODULES out of the daemon (False for a type whose libraries import them)."""

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
            # The daemon's modules are imported only now, after the unused ones are kept out: nothing
            # imported so far (click, the config loader) pulls in asyncio, which would import ssl.
            if lean:
                keep_out_unused_modules()
            import asyncio

            from .daemon import prepare, serve

            try:
                sandboxer, systemd = prepare(config, make_sandboxer)
                asyncio.run(serve(config, sandboxer, systemd))
            except KuasarError as exc:
                click.echo(f"{name}-sandboxer: {exc.message}", err=True)
                sys.exit(1)

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
