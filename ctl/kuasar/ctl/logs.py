"""Reading CRI container logs (`<RFC3339Nano time> <stdout|stderr> <P|F> <text>` per line).

containerd writes them on the host at ContainerStatus.log_path; `P` marks a partial line (the text
continues in the next record), `F` a full one.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FOLLOW_POLL = 0.2


@dataclass
class Record:
    time: str
    stream: str
    partial: bool
    text: bytes


def parse_line(line: bytes) -> Record | None:
    """One log line (without its newline), or None for a line that is not in CRI format."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[1] not in (b"stdout", b"stderr"):
        return None
    text = parts[3] if len(parts) == 4 else b""
    return Record(parts[0].decode(errors="replace"), parts[1].decode(), parts[2] == b"P", text)


def records(data: bytes) -> Iterator[Record]:
    for line in data.split(b"\n"):
        if line:
            record = parse_line(line)
            if record is not None:
                yield record


def render(record: Record, timestamps: bool) -> bytes:
    prefix = f"{record.time} ".encode() if timestamps else b""
    return prefix + record.text + (b"" if record.partial else b"\n")


def tail_records(data: bytes, tail: int | None) -> list[Record]:
    items = list(records(data))
    if tail is None or tail < 0:
        return items
    # Count full lines, keeping the partial pieces that lead up to each.
    out: list[Record] = []
    full = 0
    for record in reversed(items):
        if not record.partial:
            full += 1
            if full > tail:
                break
        out.append(record)
    return list(reversed(out))


class LogFileError(Exception):
    """The log file cannot be read (gone, or not ours to read)."""


def _read_from(file: Path, offset: int, *, missing_ok: bool) -> bytes:
    """The file's bytes from `offset` on; nothing for a missing file if `missing_ok`."""
    try:
        with file.open("rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        if missing_ok:
            return b""
        raise LogFileError(f"log file {file} does not exist") from None
    except OSError as exc:
        raise LogFileError(f"log file {file}: {exc.strerror or exc}") from None


def write(record: Record, timestamps: bool, stdout: BinaryIO, stderr: BinaryIO) -> None:
    target = stderr if record.stream == "stderr" else stdout
    target.write(render(record, timestamps))
    target.flush()


async def show(path: str, *, tail: int | None = None, timestamps: bool = False, follow: bool = False,
               still_running: Callable[[], Awaitable[bool]] | None = None,
               stdout: BinaryIO | None = None, stderr: BinaryIO | None = None) -> None:
    """Print the log at `path`; with `follow`, keep printing new lines while `still_running()` is true."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    file = Path(path)
    # Following, a missing file is one a container just created has not written yet.
    data = _read_from(file, 0, missing_ok=follow)
    complete = data[: data.rfind(b"\n") + 1]
    for record in tail_records(complete, tail):
        write(record, timestamps, stdout, stderr)
    offset = len(complete)
    while follow:
        running = await still_running() if still_running is not None else True
        chunk = _read_from(file, offset, missing_ok=True)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for record in records(complete):
            write(record, timestamps, stdout, stderr)
        offset += len(complete)
        if not running:
            return
        await asyncio.sleep(FOLLOW_POLL)
