"""Daemon configuration: Kuasar's flags plus an optional TOML file (`--config`)."""

from __future__ import annotations

from collections.abc import Mapping
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

    def section(self, name: str, keys: Mapping[str, type] | None = None) -> dict[str, Any]:
        """Table `[name]` ({} when absent); with `keys`, only those keys, each of its type."""
        value = self.sections.get(name, {})
        return checked_table(value, name, keys) if keys is not None else _table(value, name)

    def check_tables(self, *names: str) -> None:
        """Refuse top-level tables this sandboxer does not read besides [sandboxer] (another type's, a typo)."""
        unknown = sorted(set(self.sections) - {"sandboxer", *names})
        if unknown:
            raise InvalidArgument(f"unknown config table(s) {', '.join(f'[{n}]' for n in unknown)}: this "
                                  f"sandboxer reads [sandboxer] and {', '.join(f'[{n}]' for n in names)}")


TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer"}
SANDBOXER_KEYS: Mapping[str, type] = {"events_address": str}


def _table(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"config section [{name}] must be a table")
    return value


def checked_table(value: Any, name: str, keys: Mapping[str, type]) -> dict[str, Any]:
    """`value` as table `[name]` whose keys are all in `keys` and of their type: a misspelt key
    (`events-address`) or a wrong type (`binary = ["runc"]`) was taken silently."""
    table = _table(value, name)
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise InvalidArgument(f"unknown key(s) in [{name}]: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(keys)) or 'none'})")
    for key, kind in keys.items():
        if key in table and (not isinstance(table[key], kind) or (kind is int and isinstance(table[key], bool))):
            raise InvalidArgument(f"[{name}] {key} must be {TYPE_NAMES[kind]}, not {table[key]!r}")
    return table


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
    general = checked_table(sections.get("sandboxer", {}), "sandboxer", SANDBOXER_KEYS)
    return DaemonConfig(
        listen=Path(listen).absolute(),
        dir=Path(directory).absolute(),
        log_level=log_level,
        events_address=str(general.get("events_address", "")),
        sections=sections,
    )
