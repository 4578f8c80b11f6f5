"""Daemon configuration: Kuasar's flags plus an optional TOML file (`--config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument


@dataclass
class DaemonConfig:
    """What every sandboxer needs; `sections` keeps the rest of the TOML for the sandbox type to read."""

    listen: Path
    dir: Path
    log_level: str = "info"
    # containerd's ttrpc socket for Events/Forward. Neither the Sandbox API nor task requests carry it,
    # so it must come from configuration; empty disables publishing.
    events_address: str = ""
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        value = self.sections.get(name, {})
        if not isinstance(value, dict):
            raise InvalidArgument(f"config section [{name}] must be a table")
        return value


def load_config(listen: str, directory: str, config_path: str | None, log_level: str) -> DaemonConfig:
    sections: dict[str, Any] = {}
    if config_path:
        import tomllib  # only the CLI parses TOML; the daemon it execs never loads the parser

        path = Path(config_path)
        try:
            sections = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(f"config file {path} is not UTF-8 text") from None
        except OSError as exc:  # a directory, no permission
            raise InvalidArgument(f"config file {path}: {exc.strerror}") from None
    general = sections.get("sandboxer", {})
    if not isinstance(general, dict):
        raise InvalidArgument("config section [sandboxer] must be a table")
    return DaemonConfig(
        listen=Path(listen).absolute(),
        dir=Path(directory).absolute(),
        log_level=log_level,
        events_address=str(general.get("events_address", "")),
        sections=sections,
    )
